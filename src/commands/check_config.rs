//! `nbdcrypt check-config FILE`: parse and validate a config file, check the files it names,
//! and print the resolved configuration (every default filled in, every path absolute).

use std::fmt::Write as _;
use std::path::Path;

use super::CmdError;
use crate::backend::Caching;
use crate::config::{Config, ControlSocket};
use crate::server::ListenAddr;

pub(super) fn check_config(file: &Path) -> Result<(), CmdError> {
    let c = Config::load(file)?;
    let problems = check_files(&c);
    print!("{}", render(&c));
    if problems.is_empty() {
        println!("\n# {}: OK", file.display());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("nbdcrypt: {}: {p}", file.display());
        }
        Err(CmdError::Invalid(format!("{} problem(s) in {}", problems.len(), file.display())))
    }
}

/// What the daemon would trip over at start: devices and KEK files that are missing or
/// unreadable, an export without a key provider. (The control socket's folder is created at
/// start, so it need not exist yet.)
fn check_files(c: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for e in &c.exports {
        let creatable = e.create.is_some() && !e.device.exists();
        if !creatable {
            if let Err(err) = std::fs::OpenOptions::new().read(true).open(&e.device) {
                problems.push(format!("export {:?}: device {}: {err}", e.name, e.device.display()));
            }
        }
        for k in &e.kek_files {
            let may_be_generated = creatable && Some(k) == e.kek_files.first() && !k.exists();
            if may_be_generated {
                continue;
            }
            if let Err(err) = std::fs::File::open(k) {
                problems.push(format!("export {:?}: kek file {}: {err}", e.name, k.display()));
            }
        }
        if e.kek_files.is_empty() {
            problems.push(format!("export {:?}: no key provider (kek_files is empty)", e.name));
        }
    }
    problems
}

/// The resolved configuration, as TOML a reader can paste back.
fn render(c: &Config) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut o = String::from("# resolved configuration (defaults filled in, paths absolute)\n[server]\n");
    let tcp: Vec<String> = c
        .listeners
        .iter()
        .filter_map(|l| match l {
            ListenAddr::Tcp(a) => Some(q(a)),
            ListenAddr::Unix { .. } => None,
        })
        .collect();
    let _ = writeln!(o, "listen = [{}]", tcp.join(", "));
    for l in &c.listeners {
        if let ListenAddr::Unix { path, perms } = l {
            let _ = writeln!(o, "socket = {}\nsocket_mode = \"{:04o}\"", q(&path.display().to_string()), perms.mode);
            if let Some(owner) = &perms.owner {
                let _ = writeln!(o, "socket_owner = {}", q(owner));
            }
            if let Some(group) = &perms.group {
                let _ = writeln!(o, "socket_group = {}", q(group));
            }
        }
    }
    let _ = writeln!(o, "max_connections = {}", c.max_connections);
    let _ = writeln!(o, "handshake_timeout_secs = {}", c.handshake_timeout_secs);
    let _ = writeln!(o, "max_requests_per_connection = {}", c.max_requests_per_connection);
    let _ = writeln!(o, "max_bytes_per_connection = \"{}\"", c.max_bytes_per_connection);
    let _ = writeln!(o, "shutdown_grace_secs = {}", c.shutdown_grace_secs);
    let _ = writeln!(o, "busy_poll_us = {}", c.busy_poll_us);
    match c.io_threads {
        Some(n) => {
            let _ = writeln!(o, "io_threads = {n}");
        }
        None => {
            let _ = writeln!(o, "# io_threads: default, {} per CPU", crate::workers::IO_THREADS_PER_THREAD);
        }
    }
    let _ = writeln!(o, "tls = {:?}", format!("{:?}", c.tls.mode).to_lowercase());
    match c.metrics_listen {
        Some(a) => {
            let _ = writeln!(o, "metrics_listen = {}", q(&a.to_string()));
        }
        None => o.push_str("# metrics_listen: off\n"),
    }
    match &c.control_socket {
        ControlSocket::Default(p) => {
            let _ = writeln!(o, "control_socket = {}  # default", q(&p.display().to_string()));
        }
        ControlSocket::Path(p) => {
            let _ = writeln!(o, "control_socket = {}", q(&p.display().to_string()));
        }
        ControlSocket::Off => o.push_str("control_socket = \"\"  # off\n"),
    }
    let _ = writeln!(o, "\n[log]\nlevel = {}", q(c.log_level.as_deref().unwrap_or(crate::logging::DEFAULT_LEVEL)));
    let fmt = match c.log_format {
        Some(crate::logging::LogFormat::Json) => "json",
        Some(crate::logging::LogFormat::Human) => "human",
        Some(crate::logging::LogFormat::Auto) | None => "auto",
    };
    let _ = writeln!(o, "format = {}", q(fmt));
    for e in &c.exports {
        let _ = writeln!(o, "\n[[export]]\nname = {}", q(&e.name));
        let _ = writeln!(o, "description = {}", q(&e.description));
        let _ = writeln!(o, "device = {}", q(&e.device.display().to_string()));
        let keks: Vec<String> = e.kek_files.iter().map(|k| q(&k.display().to_string())).collect();
        let _ = writeln!(o, "kek_files = [{}]", keks.join(", "));
        let _ = writeln!(o, "read_only = {}\nallow_discards = {}", e.read_only, e.allow_discards);
        let (direct, map) = match e.caching {
            Caching::Direct => (true, false),
            Caching::Buffered => (false, false),
            Caching::Mapped => (false, true),
        };
        let _ = writeln!(o, "direct = {direct}\nmap = {map}");
        if let Some(id) = &e.device_id {
            let _ = writeln!(o, "device_id = {}", q(id));
        }
        let _ = writeln!(o, "strict_binding = {}", e.strict_binding);
        if let Some(cr) = &e.create {
            let _ = writeln!(o, "create = {{ size = \"{}\", sector_size = {} }}", cr.size, cr.sector_size.bytes());
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_config_parses_back_to_the_same_config() {
        let text = "[server]\nmetrics_listen = \"127.0.0.1:9810\"\nsocket = \"/run/x.sock\"\n\
                    [log]\nlevel = \"debug\"\n[[export]]\nname = \"a\"\ndevice = \"/dev/x\"\nkek_files = [\"/k\"]\n\
                    create = { size = \"1G\" }\n\
                    [[export]]\nname = \"b\"\ndevice = \"/dev/y\"\ndirect = true\n\
                    [[export]]\nname = \"c\"\ndevice = \"/dev/z\"\nmap = false\n";
        let c = Config::parse(text, Path::new("/etc/nbdcrypt/v.toml")).unwrap();
        let caching: Vec<Caching> = c.exports.iter().map(|e| e.caching).collect();
        assert_eq!(caching, [Caching::Mapped, Caching::Direct, Caching::Buffered]);
        let again = Config::parse(&render(&c), Path::new("/etc/nbdcrypt/v.toml")).unwrap();
        assert_eq!(c.exports, again.exports);
        assert_eq!(c.listeners, again.listeners);
        assert_eq!(c.metrics_listen, again.metrics_listen);
        assert_eq!(c.log_level, again.log_level);
    }

    #[test]
    fn a_missing_kek_file_is_a_problem() {
        let c = Config::parse(
            "[[export]]\nname = \"a\"\ndevice = \"/dev/null\"\nkek_files = [\"/nonexistent.kek\"]\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        let p = check_files(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("/nonexistent.kek"));
    }
}
