//! Listeners and connection lifecycle (the mini-redis shape).
//!
//! Each listener accepts under a shared connection cap (a semaphore); each connection runs
//! in its own task and logs its own error. Shutdown is a `watch` flag: listeners stop
//! accepting, connections stop reading new requests and drain what is in flight; the server
//! knows every connection has finished when every task's clone of `done_tx` is dropped.
//! Exports are then flushed once more before the process exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::nbd::handshake::{self, Catalog};
use crate::nbd::transmission::{self, Limits};

/// Send buffer asked for on Unix-socket connections (the default, about 200 KiB, makes a
/// 1 MiB reply take several writes and wake-ups; TCP autotunes its own).
const UNIX_SNDBUF: usize = 2 << 20;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    Tcp(String),
    Unix { path: PathBuf, mode: u32 },
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub limits: Limits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { max_connections: 64, handshake_timeout: Duration::from_secs(10), limits: Limits::default() }
    }
}

/// A bound listener, ready to accept.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A Unix socket is created with `mode` (umask-independent) and a stale
    /// socket file left by a previous run is replaced only if nothing listens on it.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix { path, mode } => {
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by another server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let l = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| format!("tcp {a}")).unwrap_or_else(|_| "tcp ?".into()),
            Listener::Unix(_, p) => format!("unix {}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the listeners until `shutdown` turns true, then waits for every connection to drain.
pub async fn run(listeners: Vec<Listener>, catalog: Catalog, opts: ServerOptions, shutdown: watch::Receiver<bool>) {
    let cap = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    for l in listeners {
        let ctx = AcceptCtx {
            catalog: catalog.clone(),
            opts: opts.clone(),
            cap: cap.clone(),
            shutdown: shutdown.clone(),
            done: done_tx.clone(),
        };
        tasks.push(tokio::spawn(accept_loop(l, ctx)));
    }
    drop(done_tx);
    for t in tasks {
        let _ = t.await;
    }
    // Every connection task holds a clone of done_tx; recv returns None once all are gone.
    let _ = done_rx.recv().await;
}

#[derive(Clone)]
struct AcceptCtx {
    catalog: Catalog,
    opts: ServerOptions,
    cap: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
}

async fn accept_loop(listener: Listener, mut ctx: AcceptCtx) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.shutdown.wait_for(|s| *s) => return,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.cap.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: connection limit reached");
            continue;
        };
        let c = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = c.done.clone();
            match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    connection(s, peer, c).await
                }
                Stream::Unix(s) => {
                    // Room for a whole large reply per write: fewer partial writes and
                    // wake-ups (the kernel caps it at net.core.wmem_max).
                    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, UNIX_SNDBUF);
                    connection(s, peer, c).await
                }
            }
        });
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(t) => t.accept().await.map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(u, p) => u.accept().await.map(|(s, _)| (Stream::Unix(s), format!("unix:{}", p.display()))),
    }
}

async fn connection<S>(mut stream: S, peer: String, ctx: AcceptCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let neg =
        match tokio::time::timeout(ctx.opts.handshake_timeout, handshake::negotiate(&mut stream, &ctx.catalog)).await {
            Err(_) => {
                tracing::info!(%peer, "handshake timed out");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %error_chain(&e), "handshake failed");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(n))) => n,
        };
    let export = neg.export.name().to_owned();
    tracing::info!(%peer, %export, structured = neg.structured_replies, "client connected");
    let (r, w) = tokio::io::split(stream);
    match transmission::serve(r, w, neg, ctx.opts.limits, ctx.shutdown.clone()).await {
        Ok(()) => tracing::info!(%peer, %export, "client disconnected"),
        Err(e) => tracing::info!(%peer, %export, error = %error_chain(&e), "connection closed"),
    }
}

/// "outer: cause: cause" for log lines.
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
