//! Logging: `tracing` with human-readable lines on a terminal and JSON lines otherwise (or as
//! chosen), and a log level that can change while the daemon runs (SIGHUP re-reads it from the
//! config file).
//!
//! Level precedence, highest first: `RUST_LOG`, `--log-level` / `NBDCRYPT_LOG`, the config
//! file's `[log] level`, `info`. The format is fixed at start: `--log-format`, else the config
//! file's `[log] format`, else `auto`.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
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

/// Installs the global subscriber. `config_level` is the config file's `[log] level`, if the
/// command has a config file.
pub fn init(cli_level: Option<&str>, config_level: Option<&str>, format: LogFormat) {
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
    let json_layer = json.then(|| fmt::layer().json().flatten_event(true).with_writer(std::io::stderr));
    let human_layer = (!json).then(|| fmt::layer().with_writer(std::io::stderr));
    let _ = tracing_subscriber::registry().with(filter).with(json_layer).with(human_layer).try_init();
    let _ = STATE.set(State { handle, from_env, cli_level: cli_level.map(str::to_owned) });
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
