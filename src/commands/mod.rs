//! The commands behind the CLI, one module each. Each returns a [`CmdError`] whose
//! `exit_code` the thin `main` uses. Nothing here prints key material, except
//! `inspect --dump-volume-key` (emergency access, confirmed by the operator).

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::{Command, KmsArgs};
use crate::config::ConfigError;
use crate::control::ControlError;
use crate::header::HeaderError;
use crate::keys::{local, KeyError, KeyProvider, KeySpec, Keyring, KmsOptions};
use crate::volume::VolumeError;

mod benchmark;
mod check_config;
mod control;
mod docs;
mod format;
mod header_tools;
mod inspect;
mod keyslot;
mod migrate;
mod rewrap;
mod serve;

pub use format::format_backend;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    /// The TLS certificate, key or CA could not be loaded.
    #[error("TLS setup failed")]
    Tls(#[from] crate::tls::TlsError),
    /// The command would destroy data or a key and was not told `--yes`.
    #[error("refusing: {0}")]
    Refused(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    /// The daemon's control socket could not be reached or answered nonsense.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The daemon refused or failed a control request; `exit_code` is the daemon's.
    #[error("{message}")]
    Remote { message: String, exit_code: i32 },
    /// `check-config` found problems (already printed).
    #[error("{0}")]
    Invalid(String),
}

impl CmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CmdError::Volume(v) => v.exit_code(),
            CmdError::Migrate(m) => m.exit_code(),
            CmdError::Header(_) => 4,
            CmdError::Key(KeyError::UnwrapFailed) => 3,
            CmdError::Refused(_) => 5,
            CmdError::Usage(_) => 2,
            CmdError::Control(_) => 6,
            CmdError::Remote { exit_code, .. } => *exit_code,
            CmdError::Key(_) | CmdError::Config(_) | CmdError::Tls(_) | CmdError::Io { .. } | CmdError::Invalid(_) => 1,
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CmdError {
    let what = what.into();
    move |source| CmdError::Io { what, source }
}

pub async fn run(command: Command) -> Result<(), CmdError> {
    match command {
        Command::Genkey { kek_file } => {
            let p = local::generate_kek_file(&kek_file)?;
            println!("wrote key-encryption key {} to {} (mode 0600)", p.key_id(), kek_file.display());
            Ok(())
        }
        Command::Format(args) => format::format(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Inspect(args) if args.dump_volume_key => inspect::dump_volume_key(args).await,
        Command::Inspect(args) => inspect::inspect(&args.device, args.json),
        Command::Keyslot(cmd) => keyslot::run(cmd).await,
        Command::Rewrap(args) => rewrap::rewrap(args).await,
        Command::Header(cmd) => header_tools::run(cmd).await,
        Command::Migrate(args) => migrate::migrate(args).await,
        Command::Encrypt(args) => migrate::encrypt(args).await,
        Command::Reencrypt(args) => migrate::reencrypt(args).await,
        Command::Decrypt(args) => migrate::decrypt(args).await,
        Command::Benchmark(args) => benchmark::benchmark(args).await,
        Command::Status { target, json } => control::status(&target, json).await,
        Command::Suspend { target, export } => control::suspend(&target, export).await,
        Command::Resume { target, export, kek_file } => control::resume(&target, export, kek_file).await,
        Command::CheckConfig { file } => check_config::check_config(&file),
        Command::Completions { shell } => docs::completions(shell),
        Command::Manpage { dir } => docs::manpage(dir.as_deref()),
    }
}

/// Builds a provider from a `--key` spec (a KEK file, or a KMS key reached with `kms`).
pub async fn provider_for(spec: &KeySpec, kms: &KmsArgs) -> Result<Box<dyn KeyProvider>, CmdError> {
    Ok(Keyring::new(&[], kms_options(kms))?.provider_for_spec(spec).await?)
}

/// The KMS settings of the command line.
pub fn kms_options(kms: &KmsArgs) -> KmsOptions {
    KmsOptions { timeout: kms.kms_timeout, endpoint: kms.kms_endpoint.clone() }
}

/// The keys a command may unlock with: the KEK files given, and KMS for aws-kms slots.
pub fn keyring(kek_files: &[PathBuf], kms: &KmsArgs) -> Result<Keyring, CmdError> {
    Ok(Keyring::new(kek_files, kms_options(kms))?)
}

/// An exclusive advisory lock (`flock`) on the device, held while a command reads, changes
/// and writes the header, so that two nbdcrypt commands changing the same header at once
/// cannot lose one's update. Released when the returned file is dropped.
pub(crate) fn lock_header(device: &std::path::Path) -> Result<std::fs::File, CmdError> {
    use rustix::fs::{flock, FlockOperation};
    let f = std::fs::File::open(device).map_err(io_err(format!("cannot open {}", device.display())))?;
    flock(&f, FlockOperation::NonBlockingLockExclusive).map_err(|e| CmdError::Io {
        what: format!(
            "{} is locked by another process (another nbdcrypt command changing its header?)",
            device.display()
        ),
        source: e.into(),
    })?;
    Ok(f)
}

/// Asks the operator to type `yes` before something destructive or sensitive, unless `yes`
/// was given. Without a terminal on stdin there is nobody to ask: refuse (exit code 5).
pub(crate) fn confirm(what: &str, yes: bool) -> Result<(), CmdError> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CmdError::Refused(format!("{what}: stdin is not a terminal to confirm on (use --yes)")));
    }
    eprint!("{what}. Type yes to continue: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    // Bounded: one short line is all that is expected.
    let mut limited = stdin.lock().take(64);
    limited.read_line(&mut answer).map_err(io_err("reading the confirmation"))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(CmdError::Refused(format!("{what}: not confirmed")))
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
