//! The TOML configuration: raw structs (`deny_unknown_fields`, explicit defaults) converted
//! into a validated [`Config`]. Relative paths are resolved against the config file's folder.
//!
//! ```toml
//! [server]
//! listen = ["127.0.0.1:10809"]     # TCP listeners
//! socket = "/run/nbdcrypt/vol.sock" # optional Unix socket
//! socket_mode = "0660"
//! max_connections = 64
//! handshake_timeout_secs = 10
//!
//! [[export]]
//! name = "demo"
//! device = "../var/demo.img"
//! kek_files = ["../var/demo.kek"]
//! read_only = false
//! allow_discards = false
//! direct = false                    # O_DIRECT on the raw volume (qemu cache=none)
//! description = "demo volume"
//! # Clone awareness: the device's cloud volume id (default: from the EBS NVMe serial), and
//! # whether a header bound to another volume is refused rather than only warned about.
//! device_id = "vol-0123456789abcdef0"
//! strict_binding = false
//! # Create and format the device on first start if (and only if) the file does not exist.
//! create = { size = "1G", sector_size = 4096 }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::server::ListenAddr;
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
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            socket: None,
            socket_mode: default_socket_mode(),
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake_timeout(),
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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenAddr>,
    pub max_connections: usize,
    pub handshake_timeout_secs: u64,
    pub exports: Vec<ExportConfig>,
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub name: String,
    pub device: PathBuf,
    pub kek_files: Vec<PathBuf>,
    pub read_only: bool,
    pub allow_discards: bool,
    /// Bypass the page cache on the raw volume (`O_DIRECT`).
    pub direct: bool,
    pub description: String,
    pub create: Option<CreateConfig>,
    /// The device's cloud volume id, compared with the header's binding (`None`: from sysfs).
    pub device_id: Option<String>,
    /// Refuse a header bound to another volume instead of warning.
    pub strict_binding: bool,
}

/// Create-on-first-start of a demo volume file.
#[derive(Debug, Clone)]
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
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

        let mode = u32::from_str_radix(raw.server.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| invalid(format!("server.socket_mode {:?} is not an octal mode", raw.server.socket_mode)))?;
        let mut listeners: Vec<ListenAddr> = raw.server.listen.iter().map(|a| ListenAddr::Tcp(a.clone())).collect();
        if let Some(s) = &raw.server.socket {
            listeners.push(ListenAddr::Unix { path: resolve(s), mode });
        }
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
                direct: e.direct,
                description: e.description,
                create,
                device_id: e.device_id,
                strict_binding: e.strict_binding,
            });
        }
        Ok(Config {
            listeners,
            max_connections: raw.server.max_connections.max(1),
            handshake_timeout_secs: raw.server.handshake_timeout_secs.max(1),
            exports,
        })
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

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
