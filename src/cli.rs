//! The command line (clap derive). Parsing only; the commands live in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::keys::KeySpec;

#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about = "Encrypted block devices over NBD, keys wrapped by a KMS or a local KEK")]
#[command(
    after_help = "Exit codes: 0 success, 1 error, 2 usage, 3 volume cannot be unlocked (no slot opens, wrong key), \
4 header missing, corrupt or tampered, 5 refused to destroy data (use --yes), 6 cannot reach the daemon's control socket\n\n\
Signals (serve): SIGTERM/SIGINT drain and exit 0; SIGHUP re-reads the config file (log level, metrics endpoint)."
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter) [default: the config
    /// file's [log] level, else info]. RUST_LOG overrides it.
    #[arg(long, global = true, env = "NBDCRYPT_LOG")]
    pub log_level: Option<String>,
    /// Log output format [default: the config file's [log] format, else auto].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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
    /// Measure the sector cipher's throughput on this CPU (like `cryptsetup benchmark`).
    #[command(after_help = "Example:\n  nbdcrypt benchmark --seconds 1")]
    Benchmark {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
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
