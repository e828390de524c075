//! The control socket: how `nbdcrypt status`, `suspend` and `resume` talk to a running daemon.
//!
//! A Unix stream socket, mode 0600, whose peers must also be root or the daemon's own user
//! (checked with `SO_PEERCRED`, so the mode is not the only guard). One request per
//! connection: the client sends one JSON line ([`ControlRequest`]), the daemon answers one JSON
//! line ([`ControlResponse`]) and closes. Requests are bounded to [`MAX_REQUEST`] bytes.
//!
//! No key material ever crosses this socket: `resume` names a KEK *file* for the daemon to read,
//! or none (the daemon then uses the key providers it was configured with).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::keys::BoxFuture;
use crate::metrics::ExportCounters;
use crate::server::{ListenAddr, Listener};

/// Largest request line accepted.
pub const MAX_REQUEST: u64 = 64 << 10;
/// Time a client has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The default control socket folder (systemd's `RuntimeDirectory=nbdcrypt`).
pub const DEFAULT_DIR: &str = "/run/nbdcrypt";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Exports, clients, counters, state.
    Status {},
    /// Drop the key of one export (or all), holding I/O.
    Suspend { export: Option<String> },
    /// Unlock one export (or all suspended ones) again through a key slot.
    Resume { export: Option<String>, kek_file: Option<PathBuf> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    Done {
        message: String,
    },
    Status(DaemonStatus),
    /// The request failed; `exit_code` is what the client command exits with (README table).
    Error {
        message: String,
        exit_code: i32,
    },
}

/// What `nbdcrypt status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Key-schedule holders alive in the daemon (AWS-LC XTS contexts, or one per export on the
    /// wide engine); 0 when every export is suspended.
    pub cipher_contexts: usize,
    /// Pages `mlock`ed for key memory (secrets and key schedules).
    #[serde(default)]
    pub locked_key_pages: usize,
    /// Live key allocations the OS refused to lock (`RLIMIT_MEMLOCK`); anything but 0 means key
    /// bytes may reach swap.
    #[serde(default)]
    pub unlocked_key_allocations: usize,
    pub exports: Vec<ExportStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    /// `active`, `suspended`, or `closed` (suspended at shutdown).
    pub state: String,
    pub device: String,
    pub uuid: String,
    /// The key slot that unlocked the volume last.
    pub slot: u32,
    pub size: u64,
    pub sector_size: u32,
    pub read_only: bool,
    /// The sector cipher's engine (`vaes-avx512` or `aws-lc`); absent while suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    pub counters: ExportCounters,
}

/// Answers control requests (the serve command implements it).
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, req: ControlRequest) -> BoxFuture<'_, ControlResponse>;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the control socket {path} (is the daemon running, and is this its socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: connection failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: the daemon sent an answer that is not understood")]
    BadResponse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("control socket {path}: no answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
}

/// Sends one request and waits (at most `timeout`) for the answer.
pub async fn call(path: &Path, req: &ControlRequest, timeout: Duration) -> Result<ControlResponse, ControlError> {
    let io = |source| ControlError::Io { path: path.to_owned(), source };
    let mut s =
        UnixStream::connect(path).await.map_err(|source| ControlError::Connect { path: path.to_owned(), source })?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    let exchange = async {
        s.write_all(&line).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout { path: path.to_owned(), secs: timeout.as_secs() })?
        .map_err(io)?;
    serde_json::from_slice(&out).map_err(|source| ControlError::BadResponse { path: path.to_owned(), source })
}

/// A bound control socket.
#[derive(Debug)]
pub struct ControlServer {
    listener: Listener,
}

impl ControlServer {
    /// Binds `path` with mode 0600 (creating its folder if needed); a stale socket from a
    /// previous run is replaced, a live one is an error.
    pub async fn bind(path: &Path) -> std::io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let listener = Listener::bind(&ListenAddr::Unix {
            path: path.to_owned(),
            perms: crate::server::SocketPerms { mode: 0o600, owner: None, group: None },
        })
        .await?;
        Ok(ControlServer { listener })
    }

    pub fn describe(&self) -> String {
        self.listener.describe()
    }

    /// Serves until `shutdown` turns true.
    pub async fn run<H: ControlHandler>(self, handler: Arc<H>, mut shutdown: watch::Receiver<bool>) {
        let Listener::Unix(l, _) = &self.listener else { return };
        let me = rustix::process::geteuid().as_raw();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                a = l.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me => {}
                Ok(c) => {
                    tracing::warn!(uid = c.uid(), "control connection refused: not root nor the daemon's user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control connection refused: no peer credentials");
                    continue;
                }
            }
            let h = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, h.as_ref()).await {
                    tracing::debug!(error = %e, "control connection failed");
                }
            });
        }
    }
}

async fn serve_one<H: ControlHandler>(stream: UnixStream, handler: &H) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = Vec::new();
    let mut limited = BufReader::new(r.take(MAX_REQUEST));
    tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let resp = match serde_json::from_slice::<ControlRequest>(&line) {
        Ok(req) => {
            tracing::debug!(request = ?req, "control request");
            handler.handle(req).await
        }
        Err(e) => ControlResponse::Error { message: format!("bad request: {e}"), exit_code: 2 },
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// The default control socket of a daemon serving `config` (`/run/nbdcrypt/STEM.ctl`) or, from
/// the command line, export `export` (`/run/nbdcrypt/EXPORT.ctl`).
pub fn default_path(config: Option<&Path>, export: &str) -> PathBuf {
    let stem = config.and_then(|c| c.file_stem()).map(|s| s.to_string_lossy().into_owned());
    let name = stem.unwrap_or_else(|| export.replace('/', "_"));
    Path::new(DEFAULT_DIR).join(format!("{name}.ctl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl ControlHandler for Echo {
        fn handle(&self, req: ControlRequest) -> BoxFuture<'_, ControlResponse> {
            Box::pin(async move { ControlResponse::Done { message: format!("{req:?}") } })
        }
    }

    #[test]
    fn requests_have_a_stable_json_form() {
        let r = ControlRequest::Resume { export: Some("v".into()), kek_file: None };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"cmd":"resume","export":"v","kek_file":null}"#);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"status","x":1}"#).is_err());
    }

    #[test]
    fn default_path_follows_the_config_name() {
        assert_eq!(default_path(Some(Path::new("/etc/nbdcrypt/vol1.toml")), "x"), Path::new("/run/nbdcrypt/vol1.ctl"));
        assert_eq!(default_path(None, "a/b"), Path::new("/run/nbdcrypt/a_b.ctl"));
    }

    #[tokio::test]
    async fn a_request_gets_its_answer_and_the_socket_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let server = ControlServer::bind(&path).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(server.run(Arc::new(Echo), rx));
        let r = call(&path, &ControlRequest::Status {}, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, ControlResponse::Done { message: "Status".into() });
        tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_gets_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::bind(&path).await.unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(server.run(Arc::new(Echo), rx));
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"cmd\":\"format\"}\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let r: ControlResponse = serde_json::from_str(&out).unwrap();
        assert!(matches!(r, ControlResponse::Error { exit_code: 2, .. }), "{r:?}");
    }
}
