//! The TOML configuration: raw structs (`deny_unknown_fields`, explicit defaults) converted
//! into a validated [`Config`]. Relative paths are resolved against the config file's folder.
//!
//! Every key, with its default (`config/nbdcrypt.toml` documents each one):
//!
//! ```toml
//! [server]
//! listen = ["127.0.0.1:10809"]     # TCP listeners; [] for none
//! socket = "/run/nbdcrypt/vol.sock" # optional Unix socket (default: none)
//! socket_mode = "0600"
//! max_connections = 64
//! handshake_timeout_secs = 10
//! metrics_listen = "127.0.0.1:9810" # Prometheus endpoint (default: off)
//! control_socket = "/run/nbdcrypt/vol.ctl" # default /run/nbdcrypt/<config name>.ctl; "" = off
//! socket_owner = "root"            # optional: name or numeric id
//! socket_group = "disk"            # optional: name or numeric id
//! max_requests_per_connection = 128
//! max_bytes_per_connection = "12M"
//! shutdown_grace_secs = 2
//! io_threads = 32                  # blocking-pool threads in all (default: 16 per CPU)
//! busy_poll_us = 50                # poll a quiet connection this long for its next request
//! tls = "require"                  # off | optional | require (default: require if tls_cert is set)
//! tls_cert = "server-cert.pem"     # PEM chain
//! tls_key = "server-key.pem"       # PEM private key
//! tls_ca = "ca-cert.pem"           # optional: require client certificates from this CA
//!
//! [log]
//! level = "info"                    # tracing filter; reloaded on SIGHUP
//! format = "auto"                   # auto | human | json
//!
//! [[export]]
//! name = "demo"
//! device = "../var/demo.img"
//! kek_files = ["../var/demo.kek"]
//! read_only = false
//! allow_discards = false
//! direct = false                    # O_DIRECT on the raw volume (qemu cache=none)
//! map = true                        # read cached ranges through a mapping of the raw volume
//! description = "demo volume"
//! # Clone awareness: the device's cloud volume id (default: from the EBS NVMe serial), and
//! # whether a header bound to another volume is refused rather than only warned about.
//! device_id = "vol-0123456789abcdef0"
//! strict_binding = false
//! # Create and format the device on first start if (and only if) the file does not exist.
//! create = { size = "1G", sector_size = 4096 }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::Caching;
use crate::logging::LogFormat;
use crate::nbd::handshake::TlsMode;
use crate::server::{ListenAddr, SocketPerms};
use crate::tls::TlsFiles;
use crate::units::SectorSize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default, rename = "export")]
    exports: Vec<RawExport>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// Default: `info` (see [`crate::logging`] for what overrides it).
    #[serde(default)]
    level: Option<String>,
    /// Default: `auto`.
    #[serde(default)]
    format: Option<LogFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default = "default_socket_mode")]
    socket_mode: String,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout_secs: u64,
    /// Default: off.
    #[serde(default)]
    metrics_listen: Option<String>,
    /// Default: `/run/nbdcrypt/<config file stem>.ctl`; an empty string turns it off.
    #[serde(default)]
    control_socket: Option<PathBuf>,
    #[serde(default)]
    socket_owner: Option<String>,
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default = "default_max_requests")]
    max_requests_per_connection: usize,
    #[serde(default = "default_max_bytes")]
    max_bytes_per_connection: String,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace_secs: u64,
    /// Default: 16 per connection thread (see `workers`).
    #[serde(default)]
    io_threads: Option<usize>,
    #[serde(default = "default_busy_poll_us")]
    busy_poll_us: u64,
    #[serde(default)]
    tls: Option<String>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            socket: None,
            socket_mode: default_socket_mode(),
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake_timeout(),
            metrics_listen: None,
            control_socket: None,
            socket_owner: None,
            socket_group: None,
            max_requests_per_connection: default_max_requests(),
            max_bytes_per_connection: default_max_bytes(),
            shutdown_grace_secs: default_shutdown_grace(),
            io_threads: None,
            busy_poll_us: default_busy_poll_us(),
            tls: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

fn default_listen() -> Vec<String> {
    vec![DEFAULT_LISTEN.to_owned()]
}
fn default_socket_mode() -> String {
    "0600".into()
}
fn default_max_connections() -> usize {
    64
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_max_requests() -> usize {
    128
}
fn default_max_bytes() -> String {
    "12M".into()
}
/// From [`crate::nbd::transmission::Limits`], for the config file and the command line alike.
pub fn default_busy_poll_us() -> u64 {
    crate::nbd::transmission::Limits::default().busy_poll.as_micros() as u64
}

/// Longest busy poll accepted: a millisecond of spinning already outlasts any wake-up it saves.
pub const MAX_BUSY_POLL_US: u64 = 1000;

fn default_shutdown_grace() -> u64 {
    2
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    name: String,
    device: PathBuf,
    #[serde(default)]
    kek_files: Vec<PathBuf>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    allow_discards: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default = "default_map")]
    map: bool,
    #[serde(default)]
    description: String,
    #[serde(default)]
    create: Option<RawCreate>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    strict_binding: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreate {
    size: String,
    #[serde(default = "default_sector")]
    sector_size: u32,
}

fn default_sector() -> u32 {
    4096
}

fn default_map() -> bool {
    true
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<ListenAddr>,
    pub max_connections: usize,
    pub handshake_timeout_secs: u64,
    pub max_requests_per_connection: usize,
    pub max_bytes_per_connection: usize,
    pub shutdown_grace_secs: u64,
    /// Blocking-pool threads in all (cache misses, direct I/O, flushes, large reads and
    /// writes), shared by the connection threads;
    /// `None`: [`crate::workers::IO_THREADS_PER_THREAD`] each.
    pub io_threads: Option<usize>,
    /// Microseconds a connection thread polls for a quiet connection's next request before it
    /// sleeps (0: never; see [`crate::nbd::transmission::Limits::busy_poll`]).
    pub busy_poll_us: u64,
    pub tls: TlsSettings,
    pub exports: Vec<ExportConfig>,
    /// The Prometheus endpoint, if any (reloadable).
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: ControlSocket,
    /// `[log] level` (reloadable); `None`: the default.
    pub log_level: Option<String>,
    /// `[log] format` (needs a restart).
    pub log_format: Option<LogFormat>,
}

/// Where the control socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSocket {
    /// The default path: failing to bind it is a warning, not an error (a non-root demo run
    /// cannot write to /run).
    Default(PathBuf),
    /// A path set explicitly: failing to bind it is an error.
    Path(PathBuf),
    Off,
}

impl ControlSocket {
    pub fn path(&self) -> Option<&Path> {
        match self {
            ControlSocket::Default(p) | ControlSocket::Path(p) => Some(p),
            ControlSocket::Off => None,
        }
    }
}

/// The TLS mode of TCP listeners and, unless it is off, the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub files: Option<TlsFiles>,
}

impl TlsSettings {
    /// Validates a TLS setting, from the config file or the command line alike. `mode`
    /// defaults to `require` when a certificate is given (a server with credentials should not
    /// be open to downgrade), `off` otherwise; `optional` and `require` need a certificate and
    /// a key; a CA (client verification) needs TLS.
    pub fn new(
        mode: Option<TlsMode>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<TlsSettings, String> {
        let mode = mode.unwrap_or(if cert.is_some() { TlsMode::Require } else { TlsMode::Off });
        if mode == TlsMode::Off {
            if ca.is_some() {
                return Err("tls_ca (client certificate verification) needs tls = optional or require".into());
            }
            return Ok(TlsSettings { mode, files: None });
        }
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(TlsSettings { mode, files: Some(TlsFiles { cert, key, ca }) }),
            _ => Err("TLS needs both tls_cert and tls_key".into()),
        }
    }
}

/// Parses `off`, `optional`, `require`.
pub fn parse_tls_mode(s: &str) -> Option<TlsMode> {
    match s {
        "off" => Some(TlsMode::Off),
        "optional" => Some(TlsMode::Optional),
        "require" => Some(TlsMode::Require),
        _ => None,
    }
}

/// Parses an octal permission mode (`0600`, `660`, `0o640`).
pub fn parse_mode(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub device: PathBuf,
    pub kek_files: Vec<PathBuf>,
    pub read_only: bool,
    pub allow_discards: bool,
    /// How the data path reaches the raw volume: `direct = true` is [`Caching::Direct`], else
    /// `map = false` is [`Caching::Buffered`].
    pub caching: Caching,
    pub description: String,
    pub create: Option<CreateConfig>,
    /// The device's cloud volume id, compared with the header's binding (`None`: from sysfs).
    pub device_id: Option<String>,
    /// Refuse a header bound to another volume instead of warning.
    pub strict_binding: bool,
}

/// Create-on-first-start of a demo volume file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateConfig {
    pub size: u64,
    pub sector_size: SectorSize,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // toml's error text names the line, column and the unknown key.
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        // Absolute, so the resolved paths mean the same from any working directory.
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        let base = base.as_path();
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

        let mode = parse_mode(&raw.server.socket_mode)
            .ok_or_else(|| invalid(format!("server.socket_mode {:?} is not an octal mode", raw.server.socket_mode)))?;
        let mut listeners: Vec<ListenAddr> = raw.server.listen.iter().map(|a| ListenAddr::Tcp(a.clone())).collect();
        if let Some(s) = &raw.server.socket {
            let perms =
                SocketPerms { mode, owner: raw.server.socket_owner.clone(), group: raw.server.socket_group.clone() };
            listeners.push(ListenAddr::Unix { path: resolve(s), perms });
        } else if raw.server.socket_owner.is_some() || raw.server.socket_group.is_some() {
            return Err(invalid("server.socket_owner and socket_group need server.socket".into()));
        }
        let tls_mode = match &raw.server.tls {
            None => None,
            Some(t) => Some(
                parse_tls_mode(t)
                    .ok_or_else(|| invalid(format!("server.tls {t:?} must be \"off\", \"optional\" or \"require\"")))?,
            ),
        };
        let tls = TlsSettings::new(
            tls_mode,
            raw.server.tls_cert.as_deref().map(resolve),
            raw.server.tls_key.as_deref().map(resolve),
            raw.server.tls_ca.as_deref().map(resolve),
        )
        .map_err(|m| invalid(format!("server: {m}")))?;
        let max_bytes = parse_size(&raw.server.max_bytes_per_connection)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "server.max_bytes_per_connection {:?} is not a size",
                    raw.server.max_bytes_per_connection
                ))
            })?;
        if listeners.is_empty() {
            return Err(invalid("no listener: set server.listen or server.socket".into()));
        }
        if raw.exports.is_empty() {
            return Err(invalid("no [[export]] defined".into()));
        }
        let mut exports = Vec::new();
        for e in raw.exports {
            if e.name.is_empty() || e.name.len() > 4096 {
                return Err(invalid("export names must be 1 to 4096 bytes".into()));
            }
            if exports.iter().any(|x: &ExportConfig| x.name == e.name) {
                return Err(invalid(format!("export {:?} is defined twice", e.name)));
            }
            let create = match e.create {
                None => None,
                Some(c) => Some(CreateConfig {
                    size: parse_size(&c.size).ok_or_else(|| {
                        invalid(format!("export {:?}: create.size {:?} is not a size", e.name, c.size))
                    })?,
                    sector_size: SectorSize::new(c.sector_size).ok_or_else(|| {
                        invalid(format!("export {:?}: create.sector_size must be 512 or 4096", e.name))
                    })?,
                }),
            };
            exports.push(ExportConfig {
                name: e.name,
                device: resolve(&e.device),
                kek_files: e.kek_files.iter().map(|p| resolve(p)).collect(),
                read_only: e.read_only,
                allow_discards: e.allow_discards,
                caching: Caching::new(e.direct, e.map),
                description: e.description,
                create,
                device_id: e.device_id,
                strict_binding: e.strict_binding,
            });
        }
        let metrics_listen = match raw.server.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                invalid(format!("server.metrics_listen {a:?} is not an IP:PORT address (e.g. 127.0.0.1:9810)"))
            })?),
        };
        let control_socket = match &raw.server.control_socket {
            None => ControlSocket::Default(crate::control::default_path(Some(path), "")),
            Some(p) if p.as_os_str().is_empty() => ControlSocket::Off,
            Some(p) => ControlSocket::Path(resolve(p)),
        };
        if raw.server.io_threads == Some(0) {
            return Err(invalid("server.io_threads must be at least 1".into()));
        }
        if raw.server.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(invalid(format!("server.busy_poll_us must be at most {MAX_BUSY_POLL_US}")));
        }
        if let Some(level) = &raw.log.level {
            crate::logging::validate_level(level).map_err(|e| invalid(format!("log.level {level:?}: {e}")))?;
        }
        Ok(Config {
            listeners,
            max_connections: raw.server.max_connections.max(1),
            handshake_timeout_secs: raw.server.handshake_timeout_secs.max(1),
            max_requests_per_connection: raw.server.max_requests_per_connection.max(1),
            max_bytes_per_connection: max_bytes,
            shutdown_grace_secs: raw.server.shutdown_grace_secs,
            io_threads: raw.server.io_threads,
            busy_poll_us: raw.server.busy_poll_us,
            tls,
            exports,
            metrics_listen,
            control_socket,
            log_level: raw.log.level,
            log_format: raw.log.format,
        })
    }

    /// The `[log]` table only, read leniently before logging starts (the full, strict parse
    /// comes later and reports any error).
    pub fn peek_log(path: &Path) -> (Option<String>, Option<LogFormat>) {
        let Ok(text) = std::fs::read_to_string(path) else { return (None, None) };
        let Ok(table) = text.parse::<toml::Table>() else { return (None, None) };
        let Some(log) = table.get("log").and_then(|l| l.as_table()) else { return (None, None) };
        let level = log.get("level").and_then(|v| v.as_str()).map(str::to_owned);
        let format = log.get("format").and_then(|v| v.as_str()).and_then(|f| match f {
            "auto" => Some(LogFormat::Auto),
            "human" => Some(LogFormat::Human),
            "json" => Some(LogFormat::Json),
            _ => None,
        });
        (level, format)
    }

    /// What changed from `self` to `new` and cannot be applied without a restart (the names of
    /// the settings). Reloadable settings (log level, metrics endpoint) are not listed.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.listeners != new.listeners {
            v.push("server.listen / server.socket / server.socket_mode");
        }
        if self.max_connections != new.max_connections {
            v.push("server.max_connections");
        }
        if self.io_threads != new.io_threads {
            v.push("server.io_threads");
        }
        if self.busy_poll_us != new.busy_poll_us {
            v.push("server.busy_poll_us");
        }
        if self.handshake_timeout_secs != new.handshake_timeout_secs {
            v.push("server.handshake_timeout_secs");
        }
        if self.control_socket != new.control_socket {
            v.push("server.control_socket");
        }
        if self.log_format != new.log_format {
            v.push("log.format");
        }
        if self.exports != new.exports {
            v.push("[[export]]");
        }
        v
    }
}

/// Parses `1024`, `64K`, `512M`, `1G`, `2T` (IEC units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_rejected_with_its_name_and_line() {
        let err = Config::parse("[server]\nlisten = []\nbogus = 1\n", Path::new("/x.toml")).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c =
            Config::parse("[[export]]\nname = \"a\"\ndevice = \"d.img\"\n", Path::new("/etc/nbdcrypt/a.toml")).unwrap();
        assert_eq!(c.exports[0].device, PathBuf::from("/etc/nbdcrypt/d.img"));
        assert!(matches!(&c.listeners[0], ListenAddr::Tcp(a) if a == DEFAULT_LISTEN));
    }

    const EXPORT: &str = "[[export]]\nname = \"a\"\ndevice = \"d.img\"\n";

    #[test]
    fn tls_defaults_to_require_when_a_certificate_is_given() {
        let text = format!("[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n{EXPORT}");
        let c = Config::parse(&text, Path::new("/etc/n/a.toml")).unwrap();
        assert_eq!(c.tls.mode, TlsMode::Require);
        assert_eq!(c.tls.files.unwrap().cert, PathBuf::from("/etc/n/c.pem"));
        let c = Config::parse(EXPORT, Path::new("/a.toml")).unwrap();
        assert_eq!(c.tls, TlsSettings { mode: TlsMode::Off, files: None });
    }

    #[test]
    fn tls_without_a_key_is_refused() {
        let text = format!("[server]\ntls = \"optional\"\ntls_cert = \"c.pem\"\n{EXPORT}");
        let err = Config::parse(&text, Path::new("/a.toml")).unwrap_err().to_string();
        assert!(err.contains("tls_key"), "{err}");
    }

    #[test]
    fn unknown_tls_mode_is_refused() {
        let text = format!("[server]\ntls = \"sometimes\"\n{EXPORT}");
        assert!(Config::parse(&text, Path::new("/a.toml")).is_err());
    }

    #[test]
    fn socket_owner_and_limits_are_read() {
        let text = format!(
            "[server]\nsocket = \"s.sock\"\nsocket_mode = \"0660\"\nsocket_group = \"disk\"\n\
             max_requests_per_connection = 8\nmax_bytes_per_connection = \"1M\"\n{EXPORT}"
        );
        let c = Config::parse(&text, Path::new("/r/a.toml")).unwrap();
        let unix = c.listeners.iter().find_map(|l| match l {
            ListenAddr::Unix { perms, .. } => Some(perms.clone()),
            ListenAddr::Tcp(_) => None,
        });
        assert_eq!(unix, Some(SocketPerms { mode: 0o660, owner: None, group: Some("disk".into()) }));
        assert_eq!((c.max_requests_per_connection, c.max_bytes_per_connection), (8, 1 << 20));
    }

    #[test]
    fn ops_settings_default_to_off_and_a_socket_named_after_the_config() {
        let c =
            Config::parse("[[export]]\nname = \"a\"\ndevice = \"d\"\n", Path::new("/etc/nbdcrypt/vol1.toml")).unwrap();
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.control_socket, ControlSocket::Default(PathBuf::from("/run/nbdcrypt/vol1.ctl")));
        assert_eq!(c.log_level, None);
    }

    #[test]
    fn ops_settings_parse() {
        let text = "[server]\nmetrics_listen = \"127.0.0.1:9810\"\ncontrol_socket = \"c.ctl\"\n\
                    [log]\nlevel = \"debug\"\nformat = \"json\"\n[[export]]\nname = \"a\"\ndevice = \"d\"\n";
        let c = Config::parse(text, Path::new("/etc/x.toml")).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9810".parse().unwrap()));
        assert_eq!(c.control_socket, ControlSocket::Path(PathBuf::from("/etc/c.ctl")));
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn a_bad_metrics_address_is_refused() {
        let text = "[server]\nmetrics_listen = \"localhost\"\n[[export]]\nname = \"a\"\ndevice = \"d\"\n";
        let err = Config::parse(text, Path::new("/x.toml")).unwrap_err().to_string();
        assert!(err.contains("metrics_listen"), "{err}");
    }

    #[test]
    fn a_listener_change_needs_a_restart_but_the_log_level_does_not() {
        let a = Config::parse("[[export]]\nname = \"a\"\ndevice = \"d\"\n", Path::new("/x.toml")).unwrap();
        let mut b = a.clone();
        b.log_level = Some("debug".into());
        b.metrics_listen = Some("127.0.0.1:1".parse().unwrap());
        assert!(a.needs_restart(&b).is_empty());
        b.max_connections = 3;
        assert_eq!(a.needs_restart(&b), vec!["server.max_connections"]);
    }

    #[test]
    fn busy_poll_defaults_to_50_and_is_bounded() {
        let c = Config::parse(EXPORT, Path::new("/a.toml")).unwrap();
        assert_eq!(c.busy_poll_us, 50);
        let b = Config::parse(&format!("[server]\nbusy_poll_us = 0\n{EXPORT}"), Path::new("/a.toml")).unwrap();
        assert_eq!(b.busy_poll_us, 0);
        assert_eq!(c.needs_restart(&b), vec!["server.busy_poll_us"]);
        let err = Config::parse(&format!("[server]\nbusy_poll_us = 1001\n{EXPORT}"), Path::new("/a.toml")).unwrap_err();
        assert!(err.to_string().contains("server.busy_poll_us"), "{err}");
    }

    #[test]
    fn io_threads_default_to_none_and_zero_is_refused() {
        let c = Config::parse(EXPORT, Path::new("/a.toml")).unwrap();
        assert_eq!(c.io_threads, None);
        let c = Config::parse(&format!("[server]\nio_threads = 48\n{EXPORT}"), Path::new("/a.toml")).unwrap();
        assert_eq!(c.io_threads, Some(48));
        let mut b = c.clone();
        b.io_threads = None;
        assert_eq!(c.needs_restart(&b), vec!["server.io_threads"]);
        let err = Config::parse(&format!("[server]\nio_threads = 0\n{EXPORT}"), Path::new("/a.toml")).unwrap_err();
        assert!(err.to_string().contains("server.io_threads"), "{err}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
