//! `nbdcrypt status`, `suspend` and `resume`: clients of a running daemon's control socket
//! ([`crate::control`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CmdError;
use crate::cli::ControlTarget;
use crate::config::Config;
use crate::control::{self, ControlRequest, ControlResponse, DaemonStatus};

/// Long enough for a resume that calls a KMS, or a suspend that waits for a large request.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The control socket: `--control-socket`, else the one `--config` names (or its default),
/// else the only `*.ctl` socket in /run/nbdcrypt.
fn socket_path(t: &ControlTarget) -> Result<PathBuf, CmdError> {
    if let Some(p) = &t.control_socket {
        return Ok(p.clone());
    }
    if let Some(c) = &t.config {
        let cfg = Config::load(c)?;
        return cfg.control_socket.path().map(Path::to_owned).ok_or_else(|| {
            CmdError::Usage(format!("{} turns the control socket off (server.control_socket = \"\")", c.display()))
        });
    }
    let dir = Path::new(control::DEFAULT_DIR);
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "ctl")).collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CmdError::Usage(format!(
            "no control socket in {}: pass --config FILE or --control-socket PATH",
            dir.display()
        ))),
        _ => Err(CmdError::Usage(format!(
            "several daemons have control sockets in {}: pass --config FILE or --control-socket PATH",
            dir.display()
        ))),
    }
}

async fn request(t: &ControlTarget, req: ControlRequest) -> Result<ControlResponse, CmdError> {
    let path = socket_path(t)?;
    match control::call(&path, &req, TIMEOUT).await? {
        ControlResponse::Error { message, exit_code } => Err(CmdError::Remote { message, exit_code }),
        r => Ok(r),
    }
}

fn print_done(r: ControlResponse) {
    if let ControlResponse::Done { message } = r {
        println!("{message}");
    }
}

pub(super) async fn suspend(t: &ControlTarget, export: Option<String>) -> Result<(), CmdError> {
    print_done(request(t, ControlRequest::Suspend { export }).await?);
    Ok(())
}

pub(super) async fn resume(
    t: &ControlTarget,
    export: Option<String>,
    kek_file: Option<PathBuf>,
) -> Result<(), CmdError> {
    // The daemon runs elsewhere (another cwd): send an absolute path. Only the path goes.
    let kek_file = match kek_file {
        Some(p) => Some(std::path::absolute(&p).map_err(super::io_err(format!("bad path {}", p.display())))?),
        None => None,
    };
    print_done(request(t, ControlRequest::Resume { export, kek_file }).await?);
    Ok(())
}

pub(super) async fn status(t: &ControlTarget, json: bool) -> Result<(), CmdError> {
    let ControlResponse::Status(st) = request(t, ControlRequest::Status {}).await? else {
        return Err(CmdError::Remote {
            message: "the daemon answered status with something else".into(),
            exit_code: 1,
        });
    };
    if json {
        let text = serde_json::to_string_pretty(&st)
            .map_err(|e| CmdError::Io { what: "cannot encode the status".into(), source: std::io::Error::other(e) })?;
        println!("{text}");
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

/// The human-readable status.
fn render(st: &DaemonStatus) -> String {
    let mut o = String::new();
    let up = st.uptime_secs;
    let _ = writeln!(
        o,
        "nbdcrypt {} (pid {}), up {}h{:02}m{:02}s, {} cipher context(s) alive, {} page(s) of key memory locked",
        st.version,
        st.pid,
        up / 3600,
        up / 60 % 60,
        up % 60,
        st.cipher_contexts,
        st.locked_key_pages
    );
    if st.unlocked_key_allocations > 0 {
        let _ = writeln!(
            o,
            "WARNING: {} key allocation(s) could not be locked in memory (raise RLIMIT_MEMLOCK); key bytes may be swapped",
            st.unlocked_key_allocations
        );
    }
    for e in &st.exports {
        let c = &e.counters;
        let _ = writeln!(o, "\nexport {:?}: {}", e.name, e.state);
        let _ = writeln!(o, "  device      {}", e.device);
        let _ = writeln!(o, "  uuid        {}", e.uuid);
        let _ = writeln!(
            o,
            "  size        {} bytes, {}-byte sectors, {}",
            e.size,
            e.sector_size,
            if e.read_only { "read-only" } else { "read-write" }
        );
        if c.unlocked_at > 0 {
            let _ = writeln!(o, "  unlocked    slot {}, at {} (unix seconds)", e.slot, c.unlocked_at);
            if let Some(engine) = &e.cipher {
                let _ = writeln!(o, "  cipher      aes-xts-plain64 on {engine}");
            }
        } else {
            let _ = writeln!(o, "  unlocked    no (key wiped; I/O waits for `nbdcrypt resume`)");
        }
        let _ = writeln!(o, "  clients     {} now, {} since start", c.connections, c.connections_total);
        for cl in &c.clients {
            let _ = writeln!(o, "              {} (since {})", cl.peer, cl.since);
        }
        let pairs = |m: &std::collections::BTreeMap<String, u64>| {
            m.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(o, "  requests    {} (in flight {})", or_none(pairs(&c.requests)), c.in_flight);
        let _ = writeln!(o, "  bytes       {}", or_none(pairs(&c.bytes)));
        let _ = writeln!(o, "  errors      {}", or_none(pairs(&c.errors)));
    }
    o
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "none".into()
    } else {
        s
    }
}
