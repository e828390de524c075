//! The command line (clap derive). Parsing only; the commands live in `commands`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::keys::KeySpec;
use crate::logging::LogFormat;
use crate::nbd::handshake::TlsMode;

#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about = "Encrypted block devices over NBD, keys wrapped by a KMS or a local KEK")]
#[command(
    after_help = "Exit codes: 0 success, 1 error, 2 usage, 3 volume cannot be unlocked (no slot opens, wrong key), \
4 header missing, corrupt or tampered, 5 refused to destroy data (use --yes), 6 cannot reach the daemon's control socket\n\n\
Signals (serve): SIGTERM/SIGINT drain and exit 0; SIGHUP re-reads the config file (log level, metrics endpoint)."
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter) [default: the config
    /// file's `[log]` level, else info]. RUST_LOG overrides it.
    #[arg(long, global = true, env = "NBDCRYPT_LOG")]
    pub log_level: Option<String>,
    /// Log output format [default: the config file's `[log]` format, else auto].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
pub enum Command {
    /// Write a new random 32-byte key-encryption key for the local provider (mode 0600).
    #[command(after_help = "Example:\n  nbdcrypt genkey /etc/nbdcrypt/vol1.kek")]
    Genkey {
        /// Where to write the KEK; an existing file is never overwritten.
        kek_file: PathBuf,
    },
    /// Write a new header with a fresh random volume key, wrapped by a key provider.
    #[command(
        after_help = "Examples:\n  nbdcrypt format /dev/nvme1n1 --key local:/etc/nbdcrypt/vol1.kek\n  nbdcrypt format disk.img --key local:k.kek --sector-size 512 --yes"
    )]
    Format(FormatArgs),
    /// Serve one volume (DEVICE) or every export of a config file (--config) over NBD.
    #[command(
        after_help = "Examples:\n  nbdcrypt serve /dev/nvme1n1 --kek-file /etc/nbdcrypt/vol1.kek --export vol1\n  nbdcrypt serve --config /etc/nbdcrypt/vol1.toml\n  nbdinfo nbd://127.0.0.1:10809/vol1"
    )]
    Serve(ServeArgs),
    /// Print the header: version, uuid, cipher, geometry, key slots. Never key material,
    /// except with --dump-volume-key (emergency access).
    #[command(
        after_help = "Examples:\n  nbdcrypt inspect /dev/nvme1n1 --json\n  nbdcrypt inspect /dev/nvme1n1 --dump-volume-key --kek-file recovery.kek"
    )]
    Inspect(InspectArgs),
    /// List, add or remove key slots (copies of the volume key wrapped by different keys).
    #[command(subcommand)]
    Keyslot(KeyslotCommand),
    /// Rewrap one key slot under another key (KMS ReEncrypt when both are KMS keys); the
    /// data is not re-encrypted.
    #[command(
        after_help = "Example:\n  nbdcrypt rewrap /dev/nvme1n1 --slot 0 --to aws-kms:arn:aws:kms:eu-west-1:111122223333:key/NEW"
    )]
    Rewrap(RewrapArgs),
    /// Back up, restore or repair the header.
    #[command(subcommand)]
    Header(HeaderCommand),
    /// Copy a plaintext volume (file, block device or NBD URI) into a new encrypted one;
    /// resumable: run the same command again after an interruption.
    #[command(
        after_help = "Examples:\n  nbdcrypt migrate --from /dev/nvme1n1 --to /dev/nvme2n1 --key aws-kms:alias/vols --verify\n  nbdcrypt migrate --from nbd://10.0.0.5/disk --to new.img --key local:k.kek"
    )]
    Migrate(MigrateArgs),
    /// Encrypt a plaintext volume in place (its filesystem must leave the last 5 MiB unused:
    /// data moves 2 MiB towards the end, a 3 MiB journal sits at the very end). Resumable.
    #[command(after_help = "Example:\n  nbdcrypt encrypt /dev/nvme1n1 --key local:/etc/nbdcrypt/vol1.kek")]
    Encrypt(EncryptArgs),
    /// Re-encrypt a volume in place under a new volume key (offline). Resumable.
    #[command(
        after_help = "Example:\n  nbdcrypt reencrypt /dev/nvme1n1 --key local:old.kek --new-key aws-kms:alias/vols"
    )]
    Reencrypt(ReencryptArgs),
    /// Decrypt a volume in place back to plaintext at offset 0 (offline). Resumable.
    #[command(after_help = "Example:\n  nbdcrypt decrypt /dev/nvme1n1 --key local:/etc/nbdcrypt/vol1.kek")]
    Decrypt(DecryptArgs),
    /// Measure the sector cipher's throughput on this CPU (like `cryptsetup benchmark`), and
    /// optionally the whole request path over a temporary file (--e2e).
    #[command(
        after_help = "Examples:\n  nbdcrypt benchmark --seconds 1\n  nbdcrypt benchmark --e2e --size-mib 512 --dir /var/tmp"
    )]
    Benchmark(BenchmarkArgs),
    /// Show a running daemon's exports, their state (active/suspended), clients and counters.
    #[command(
        after_help = "Examples:\n  nbdcrypt status --config /etc/nbdcrypt/vol1.toml\n  nbdcrypt status --control-socket /run/nbdcrypt/vol1.ctl --json"
    )]
    Status {
        #[command(flatten)]
        target: ControlTarget,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Flush, then wipe the volume key of a running export from memory; its I/O waits until
    /// `resume` (like `cryptsetup luksSuspend`).
    #[command(
        after_help = "Examples:\n  nbdcrypt suspend --config /etc/nbdcrypt/vol1.toml\n  nbdcrypt suspend --control-socket /run/nbdcrypt/vol1.ctl --export vol1"
    )]
    Suspend {
        #[command(flatten)]
        target: ControlTarget,
        /// The export to suspend [default: every export of the daemon].
        #[arg(long)]
        export: Option<String>,
    },
    /// Unlock a suspended export again through a key slot and release its waiting I/O.
    #[command(
        after_help = "The daemon re-reads the header and unwraps a key slot with its configured key providers, or\n\
with the KEK file named here (read by the daemon; no key material crosses the control socket).\n\n\
Examples:\n  nbdcrypt resume --config /etc/nbdcrypt/vol1.toml\n  nbdcrypt resume --control-socket /run/nbdcrypt/vol1.ctl --export vol1 --kek-file /root/vol1.kek"
    )]
    Resume {
        #[command(flatten)]
        target: ControlTarget,
        /// The export to resume [default: every suspended export].
        #[arg(long)]
        export: Option<String>,
        /// A local KEK file for the daemon to unlock with, instead of its configured providers.
        #[arg(long)]
        kek_file: Option<PathBuf>,
    },
    /// Parse and validate a config file, check that the files it names exist and can be read,
    /// and print the resolved configuration. Exit 0 if valid, 1 if not.
    #[command(name = "check-config", after_help = "Example:\n  nbdcrypt check-config /etc/nbdcrypt/vol1.toml")]
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  nbdcrypt completions bash > /etc/bash_completion.d/nbdcrypt\n  nbdcrypt completions zsh > \"${fpath[1]}/_nbdcrypt\"\n  nbdcrypt completions fish > ~/.config/fish/completions/nbdcrypt.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a folder.
    #[command(
        after_help = "Examples:\n  nbdcrypt manpage | man -l -\n  nbdcrypt manpage --dir /usr/local/share/man/man1"
    )]
    Manpage {
        /// Write nbdcrypt.1 and nbdcrypt-COMMAND.1 into this folder instead of printing nbdcrypt.1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Also run a quick end-to-end loop: an in-process server on a Unix socket pair, serving a
    /// temporary file, driven by an in-process NBD client.
    #[arg(long)]
    pub e2e: bool,
    /// Size of the temporary file for --e2e, in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Folder for the temporary file (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Open the temporary file with O_DIRECT (see `serve --direct`).
    #[arg(long)]
    pub direct: bool,
    /// Read the temporary file with pread only (see `serve --no-map`).
    #[arg(long)]
    pub no_map: bool,
}

/// How a client command finds the daemon's control socket.
#[derive(Debug, Args)]
pub struct ControlTarget {
    /// The daemon's control socket.
    #[arg(long, conflicts_with = "config")]
    pub control_socket: Option<PathBuf>,
    /// The daemon's config file: its server.control_socket (or that setting's default).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// The raw volume: a block device or an existing file.
    pub device: PathBuf,
    /// Key provider: local:KEKFILE or aws-kms:KEY.
    #[arg(long)]
    pub key: KeySpec,
    /// Encryption sector size in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Extra encryption-context pairs (k=v), recorded in the header.
    #[arg(long = "context", value_parser = parse_kv)]
    pub context: Vec<(String, String)>,
    /// Bind the header to this cloud volume id (e.g. vol-0123456789abcdef0): recorded under
    /// the MAC and in the encryption context; `serve` warns (or refuses, --strict-binding)
    /// when the device is another volume.
    #[arg(long)]
    pub bind_volume_id: Option<String>,
    /// Format even if the device already holds an nbdcrypt header or looks like it holds data.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub kms: KmsArgs,
}

/// How to reach AWS KMS (for aws-kms keys and slots). Credentials and region come from the
/// default AWS chain (env, profile, SSO, instance profile); a key ARN names its own region.
#[derive(Debug, Clone, Args)]
pub struct KmsArgs {
    /// Total time allowed for each KMS operation, retries included (e.g. 30s, 1500ms).
    #[arg(long, env = "NBDCRYPT_KMS_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub kms_timeout: Duration,
    /// KMS endpoint URL (default: AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, or the region's).
    #[arg(long, env = "NBDCRYPT_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub device: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Unlock the volume and print its plaintext key and a dm-crypt table line (emergency
    /// access without nbdcrypt). Asks for confirmation unless --yes.
    #[arg(long)]
    pub dump_volume_key: bool,
    /// Do not ask for confirmation before printing the key.
    #[arg(long, requires = "dump_volume_key")]
    pub yes: bool,
    /// Local KEK file(s) that may unlock a slot (aws-kms slots need no flag).
    #[arg(long, requires = "dump_volume_key")]
    pub kek_file: Vec<PathBuf>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeyslotCommand {
    /// List the key slots (provider, key, encryption context, creation time).
    #[command(after_help = "Example:\n  nbdcrypt keyslot list /dev/nvme1n1")]
    List {
        device: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add a slot: unlock through an existing slot, wrap the same volume key with another key.
    #[command(
        after_help = "Examples:\n  nbdcrypt keyslot add /dev/nvme1n1 --key local:/root/recovery.kek\n  nbdcrypt keyslot add /dev/nvme1n1 --key aws-kms:arn:aws:kms:us-west-2:111122223333:key/ID --kek-file /root/recovery.kek"
    )]
    Add(KeyslotAddArgs),
    /// Remove a slot (never the last one). Another slot must unlock the volume first.
    #[command(
        after_help = "Example:\n  nbdcrypt keyslot remove /dev/nvme1n1 --slot 0 --kek-file /root/recovery.kek --yes"
    )]
    Remove(KeyslotRemoveArgs),
}

#[derive(Debug, Args)]
pub struct KeyslotAddArgs {
    pub device: PathBuf,
    /// The new slot's key: local:KEKFILE or aws-kms:KEY.
    #[arg(long)]
    pub key: KeySpec,
    /// Extra encryption-context pairs (k=v) for the new slot.
    #[arg(long = "context", value_parser = parse_kv)]
    pub context: Vec<(String, String)>,
    /// Local KEK file(s) that may unlock an existing slot.
    #[arg(long)]
    pub kek_file: Vec<PathBuf>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Args)]
pub struct KeyslotRemoveArgs {
    pub device: PathBuf,
    /// The slot to remove.
    #[arg(long)]
    pub slot: u32,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Local KEK file(s) that may unlock one of the remaining slots.
    #[arg(long)]
    pub kek_file: Vec<PathBuf>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Args)]
pub struct RewrapArgs {
    pub device: PathBuf,
    /// The slot to rewrap.
    #[arg(long)]
    pub slot: u32,
    /// The new key: aws-kms:KEY (ReEncrypt inside KMS when the slot is KMS too) or local:KEKFILE.
    #[arg(long)]
    pub to: KeySpec,
    /// Local KEK file(s) that may unlock a slot (needed unless both sides are KMS).
    #[arg(long)]
    pub kek_file: Vec<PathBuf>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Subcommand)]
pub enum HeaderCommand {
    /// Write the header to FILE (1 MiB, mode 0600; an existing file is never overwritten).
    #[command(after_help = "Example:\n  nbdcrypt header backup /dev/nvme1n1 /root/vol1.header")]
    Backup { device: PathBuf, file: PathBuf },
    /// Write a header backup back to DEVICE (same volume uuid only). The key slots the
    /// backup held come back, including any removed since.
    #[command(after_help = "Example:\n  nbdcrypt header restore /root/vol1.header /dev/nvme1n1")]
    Restore {
        file: PathBuf,
        device: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Rewrite a damaged or stale header copy from the valid one.
    #[command(after_help = "Example:\n  nbdcrypt header repair /dev/nvme1n1")]
    Repair { device: PathBuf },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The raw volume to serve (omit with --config).
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    pub device: Option<PathBuf>,
    /// A TOML file describing the server and its exports.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Export name clients ask for (an empty name also selects it).
    #[arg(long, default_value = "default")]
    pub export: String,
    /// TCP address to listen on (repeatable). Default 127.0.0.1:10809 unless --socket is given.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Unix socket to listen on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Local KEK file(s) that may unlock a slot.
    #[arg(long)]
    pub kek_file: Vec<PathBuf>,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Pass TRIM through to the raw volume (reveals which blocks are unused).
    #[arg(long)]
    pub allow_discards: bool,
    /// Bypass the page cache on the raw volume (O_DIRECT, like qemu's cache=none): for real
    /// block devices, whose data the client caches already.
    #[arg(long)]
    pub direct: bool,
    /// Read the raw volume with pread only, never through a read-only mapping of it. The
    /// mapping (the default in buffered mode) makes reads of cached data about 10% faster;
    /// without it the volume's pages never count in the daemon's RSS, and an I/O error can
    /// never reach the daemon as a fault (SIGBUS). No effect with --direct.
    #[arg(long)]
    pub no_map: bool,
    /// TLS on TCP listeners: off, optional (the client's choice) or require. Default: require
    /// when --tls-cert is given, off otherwise.
    #[arg(long, value_parser = parse_tls, conflicts_with = "config")]
    pub tls: Option<TlsMode>,
    /// PEM certificate chain of the server.
    #[arg(long, requires = "tls_key", conflicts_with = "config")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the server.
    #[arg(long, requires = "tls_cert", conflicts_with = "config")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one of them.
    #[arg(long, conflicts_with = "config")]
    pub tls_ca: Option<PathBuf>,
    /// Permission bits of the Unix socket (octal).
    #[arg(long, default_value = "0600", value_parser = parse_octal_mode, conflicts_with = "config")]
    pub socket_mode: u32,
    /// Owner of the Unix socket (user name or id).
    #[arg(long, requires = "socket", conflicts_with = "config")]
    pub socket_owner: Option<String>,
    /// Group of the Unix socket (group name or id).
    #[arg(long, requires = "socket", conflicts_with = "config")]
    pub socket_group: Option<String>,
    /// Most client connections at once; more are closed at once.
    #[arg(long, default_value_t = 64, conflicts_with = "config")]
    pub max_connections: usize,
    /// Seconds a client has to finish the handshake (TLS included).
    #[arg(long, default_value_t = 10, conflicts_with = "config")]
    pub handshake_timeout: u64,
    /// Most threads serving requests off the connection threads at once (cache misses, all
    /// I/O with --direct, flushes, large reads and writes), shared evenly by the connection
    /// threads [default: 16 per CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "config")]
    pub io_threads: Option<u32>,
    /// Microseconds to keep polling a connection with nothing in flight for its next request
    /// before sleeping: spends CPU to save the wake-up (on a VM, tens of µs) at low queue
    /// depth, when the client turns around fast. Adaptive: a connection whose client does not
    /// come back in time polls ever more rarely. 0 never polls; at most 1000.
    #[arg(long, default_value_t = crate::config::default_busy_poll_us(), value_parser = clap::value_parser!(u64).range(0..=crate::config::MAX_BUSY_POLL_US), conflicts_with = "config")]
    pub busy_poll_us: u64,
    /// The device's cloud volume id, compared with the header's binding (default: read from
    /// the EBS NVMe serial number in sysfs).
    #[arg(long, env = "NBDCRYPT_DEVICE_ID", conflicts_with = "config")]
    pub device_id: Option<String>,
    /// Refuse to serve a header bound to another volume (or whose device id is unknown).
    #[arg(long)]
    pub strict_binding: bool,
    #[command(flatten)]
    pub kms: KmsArgs,
    /// Serve Prometheus metrics over HTTP on this IP:PORT (e.g. 127.0.0.1:9810) [default: off,
    /// or the config file's server.metrics_listen].
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The control socket for status/suspend/resume ("" turns it off) [default:
    /// /run/nbdcrypt/NAME.ctl, NAME being the config file's stem or the export name].
    #[arg(long, value_parser = path_or_empty)]
    pub control_socket: Option<PathBuf>,
}

/// A path, where an empty string is allowed (it means "off").
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The plaintext source: a block device, a file, or `nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`.
    #[arg(long)]
    pub from: String,
    /// The target raw volume (formatted unless it already is this migration's target).
    #[arg(long)]
    pub to: PathBuf,
    /// Key provider for the new volume key: local:KEKFILE or aws-kms:KEY.
    #[arg(long)]
    pub key: KeySpec,
    /// Encryption sector size in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Re-read both sides after copying and compare every byte.
    #[arg(long)]
    pub verify: bool,
    /// Encrypt and write the source's zero runs too. By default runs of 64 KiB or more of
    /// zeros are left as zeros on the target (a hole in a file, zeroed blocks on a device)
    /// and read back as zeros; that keeps the target sparse but shows, as TRIM does on
    /// dm-crypt, where the source was zero.
    #[arg(long)]
    pub no_sparse: bool,
    /// Overwrite a target that holds data, another migration or a complete volume.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The plaintext raw volume.
    pub device: PathBuf,
    /// Key provider for the new volume key: local:KEKFILE or aws-kms:KEY.
    #[arg(long)]
    pub key: KeySpec,
    /// Encryption sector size in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Bytes of plaintext to encrypt (the filesystem size); default: the device minus 5 MiB.
    #[arg(long)]
    pub size: Option<u64>,
    /// Proceed even though no known filesystem tells how much of the device is in use.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Args)]
pub struct ReencryptArgs {
    /// The raw volume.
    pub device: PathBuf,
    /// Key provider that unlocks the volume now.
    #[arg(long)]
    pub key: KeySpec,
    /// Key provider that wraps the new volume key (default: the same as --key).
    #[arg(long)]
    pub new_key: Option<KeySpec>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The raw volume.
    pub device: PathBuf,
    /// Key provider that unlocks the volume.
    #[arg(long)]
    pub key: KeySpec,
    #[command(flatten)]
    pub kms: KmsArgs,
}

fn parse_tls(s: &str) -> Result<TlsMode, String> {
    crate::config::parse_tls_mode(s).ok_or_else(|| "must be off, optional or require".into())
}

fn parse_octal_mode(s: &str) -> Result<u32, String> {
    crate::config::parse_mode(s).ok_or_else(|| format!("{s:?} is not an octal mode such as 0600"))
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

/// `30`, `30s`, `1500ms`, `2m`: a duration, at most one hour.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("expected a duration like 30s or 1500ms, got {s:?}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("unknown unit {unit:?} (use ms, s or m)")),
    };
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err("must be more than 0 and at most 1 hour".into());
    }
    Ok(d)
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
