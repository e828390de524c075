//! The commands behind the CLI, one module each. Each returns a [`CmdError`] whose
//! `exit_code` the thin `main` uses; nothing here prints key material.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::Command;
use crate::config::ConfigError;
use crate::header::HeaderError;
use crate::keys::{local, KeyError, KeyProvider, KeySpec};
use crate::volume::VolumeError;

mod benchmark;
mod format;
mod inspect;
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
}

impl CmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CmdError::Volume(v) => v.exit_code(),
            CmdError::Header(_) => 4,
            CmdError::Key(KeyError::UnwrapFailed) => 3,
            CmdError::Refused(_) => 5,
            CmdError::Usage(_) => 2,
            CmdError::Key(_) | CmdError::Config(_) | CmdError::Io { .. } => 1,
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
        Command::Inspect { device, json } => inspect::inspect(&device, json),
        Command::Benchmark(args) => benchmark::benchmark(args).await,
    }
}

/// Builds a provider from a `--key` spec.
pub fn provider_for(spec: &KeySpec) -> Result<Box<dyn KeyProvider>, CmdError> {
    match spec {
        KeySpec::Local(path) => Ok(Box::new(local::LocalProvider::load(path)?)),
        KeySpec::AwsKms(_) => Err(CmdError::Usage("the aws-kms provider is not available in this build yet".into())),
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
