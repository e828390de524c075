//! Logging: `tracing` with human-readable lines on a terminal and JSON lines otherwise (or as
//! chosen), and a log level that can change while the daemon runs (SIGHUP re-reads it from the
//! config file).
//!
//! Level precedence, highest first: `RUST_LOG`, `--log-level` / `NBDCRYPT_LOG`, the config
//! file's `[log] level`, `info`. The format is fixed at start: `--log-format`, else the config
//! file's `[log] format`, else `auto`.
//!
//! The daemon (`serve`) writes its lines from a thread of their own ([`init`] with
//! `background`): the threads that serve connections only queue them. A log sink that stops
//! taking lines (a journald stream not drained, a file on a disk stuck behind writeback) used
//! to block the thread that logged, and with it every connection on that thread; now the
//! queue fills up ([`QUEUE_LINES`]) and further lines are dropped and counted
//! ([`dropped_lines`], the `nbdcrypt_log_lines_dropped_total` metric) until the sink moves
//! again. The other commands write synchronously: they are short, and their last line (often
//! the error) must not be lost.

use std::sync::OnceLock;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    Human,
    Json,
}

/// The default level when nothing sets one.
pub const DEFAULT_LEVEL: &str = "info";

struct State {
    handle: reload::Handle<EnvFilter, Registry>,
    /// RUST_LOG was set: it wins over every later change.
    from_env: bool,
    /// `--log-level` or `NBDCRYPT_LOG` was given: it wins over the config file.
    cli_level: Option<String>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Lines queued for a stuck sink before further ones are dropped: at a few hundred bytes per
/// JSON line, about 1 MiB, within the daemon's memory bound.
pub const QUEUE_LINES: usize = 4096;

/// Counts the lines the background writer dropped.
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Log lines dropped because the sink did not take them (always 0 for synchronous logging).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the background log writer running; dropping it writes out what is queued. Hold it
/// until the process exits (and drop it before `std::process::exit`, which runs no
/// destructors).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// Only dropped: that stops the writer thread after it has written the queue.
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard").field("background", &self._worker.is_some()).finish()
    }
}

/// Installs the global subscriber. `config_level` is the config file's `[log] level`, if the
/// command has a config file. With `background`, lines are written by a thread of their own
/// (see the module doc).
pub fn init(cli_level: Option<&str>, config_level: Option<&str>, format: LogFormat, background: bool) -> LogGuard {
    use std::io::IsTerminal;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(cli_level.or(config_level).unwrap_or(DEFAULT_LEVEL)))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LEVEL));
    let (filter, handle) = reload::Layer::new(filter);
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = if background {
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUE_LINES)
            .thread_name("nbdcrypt-log")
            .finish(std::io::stderr());
        let _ = DROPPED.set(writer.error_counter());
        (BoxMakeWriter::new(writer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    let layer = if json {
        fmt::layer().json().flatten_event(true).with_writer(writer).boxed()
    } else {
        fmt::layer().with_writer(writer).boxed()
    };
    let _ = tracing_subscriber::registry().with(filter).with(layer).try_init();
    let _ = STATE.set(State { handle, from_env, cli_level: cli_level.map(str::to_owned) });
    LogGuard { _worker: guard }
}

/// What [`reload_level`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// The filter is now this.
    Applied(String),
    /// RUST_LOG or the command line fixes the level; the config file's does not apply.
    Overridden(&'static str),
    /// Logging was not initialised through [`init`] (tests, library use).
    NotInitialised,
}

/// Applies the config file's level (`None`: back to the default), unless RUST_LOG or the
/// command line overrides it.
pub fn reload_level(config_level: Option<&str>) -> Result<LevelChange, String> {
    let Some(st) = STATE.get() else { return Ok(LevelChange::NotInitialised) };
    if st.from_env {
        return Ok(LevelChange::Overridden("RUST_LOG"));
    }
    if st.cli_level.is_some() {
        return Ok(LevelChange::Overridden("--log-level / NBDCRYPT_LOG"));
    }
    let level = config_level.unwrap_or(DEFAULT_LEVEL);
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log level {level:?}: {e}"))?;
    st.handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(LevelChange::Applied(level.to_owned()))
}

/// Checks that `level` is a valid filter (for config validation).
pub fn validate_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| e.to_string())
}

/// An error and its causes on one line, "outer: cause: cause", for log lines and the exit
/// message.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
