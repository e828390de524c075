//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd: one datagram of
//! newline-separated `KEY=VALUE` assignments to the Unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name starting with `@`). Outside systemd the variable is unset and
//! every call is a no-op.
//!
//! The daemon sends `READY=1` once every export is unlocked and every listener is bound,
//! `RELOADING=1` / `READY=1` around a SIGHUP reload, `STOPPING=1` when shutdown starts, and
//! `STATUS=` lines a human reads in `systemctl status`.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the service manager, if there is one.
/// Errors are returned for logging; they never stop the daemon.
pub fn notify(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(&path)?
    } else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("NOTIFY_SOCKET {path:?}")));
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// [`notify`], logging a failure at warn.
pub fn notify_or_warn(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_socket_named_by_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // Tests share the environment; this is the only test that sets NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1\nSTATUS=x").unwrap();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }
}
