//! The command line (clap derive). Parsing only; the commands live in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::keys::KeySpec;

#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about = "Encrypted block devices over NBD, keys wrapped by a KMS or a local KEK")]
#[command(
    after_help = "Exit codes: 0 success, 1 error, 2 usage, 3 volume cannot be unlocked (no slot opens, wrong key), \
4 header missing, corrupt or tampered, 5 refused to destroy data (use --yes)"
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info", env = "NBDCRYPT_LOG")]
    pub log_level: String,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
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
    /// Print the header: version, uuid, cipher, geometry, key slots. Never key material.
    #[command(after_help = "Example:\n  nbdcrypt inspect /dev/nvme1n1 --json")]
    Inspect {
        device: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure the sector cipher's throughput on this CPU (like `cryptsetup benchmark`), and
    /// optionally the whole request path over a temporary file (--e2e).
    #[command(
        after_help = "Examples:\n  nbdcrypt benchmark --seconds 1\n  nbdcrypt benchmark --e2e --size-mib 512 --dir /var/tmp"
    )]
    Benchmark(BenchmarkArgs),
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
    /// Format even if the device already holds an nbdcrypt header or looks like it holds data.
    #[arg(long)]
    pub yes: bool,
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
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
