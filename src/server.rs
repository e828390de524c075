//! Listeners and connection lifecycle (the mini-redis shape).
//!
//! Each listener accepts under a shared connection cap (a semaphore); a connection over the
//! cap is closed at once, with a (rate-limited) log line. Each connection runs in its own task,
//! on the connection thread ([`crate::workers`]) with the fewest connections, and logs its own
//! error: the handshake (bounded by a timeout that covers the TLS handshake too), the TLS
//! upgrade when the client asks for it on a TCP listener, then transmission.
//!
//! Shutdown is a `watch` flag: listeners stop accepting, handshakes still running get
//! `NBD_REP_ERR_SHUTDOWN` for the grace period, connections in transmission finish what is in
//! flight and answer `NBD_ESHUTDOWN` for the grace period. The server knows every connection
//! has finished when every task's clone of `done_tx` is dropped; exports are then flushed once
//! more before the process exits.
//!
//! Unix sockets are created with their final mode and owner before clients can reach them:
//! bound inside a fresh private (0700) directory, chmod/chown'ed there, then renamed into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::logging::error_chain;
use crate::nbd::handshake::{self, Catalog, HandshakeError, Negotiated, Outcome, TlsState};
use crate::nbd::transmission::{self, Limits, Transport};
use crate::rate_limit::RateLimit;
use crate::tls::TlsSetup;
use crate::workers::Workers;

/// Who may connect to a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// Owner, by name (looked up in /etc/passwd) or numeric id; `None` keeps the daemon's.
    pub owner: Option<String>,
    /// Group, by name (looked up in /etc/group) or numeric id; `None` keeps the daemon's.
    pub group: Option<String>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms { mode: 0o600, owner: None, group: None }
    }
}

/// Send buffer asked for on Unix-socket connections (the default, about 200 KiB, makes a
/// 1 MiB reply take several writes and wake-ups; TCP autotunes its own).
const UNIX_SNDBUF: usize = 2 << 20;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix { path: PathBuf, perms: SocketPerms },
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub max_connections: usize,
    /// Blocking-pool threads in all, serving requests off the connection threads (cache
    /// misses, direct I/O, flushes, large reads and writes); see [`Workers::per_core`].
    pub io_threads: Option<usize>,
    /// Bounds the whole handshake, TLS included.
    pub handshake_timeout: Duration,
    pub limits: Limits,
    /// TLS for TCP listeners (Unix sockets never use TLS: file permissions guard them).
    pub tls: TlsSetup,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            io_threads: None,
            handshake_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            tls: TlsSetup::off(),
        }
    }
}

/// A bound listener, ready to accept.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file left by a previous run is replaced only if
    /// nothing listens on it.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix { path, perms } => {
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by another server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let l = bind_unix_private(path, perms)?;
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

/// Binds a Unix socket at `path` that nobody can connect to with other permissions than
/// `perms`: bound in a private 0700 directory beside `path`, given its mode and owner there,
/// then renamed into place (the rename is atomic and keeps the listening socket).
fn bind_unix_private(path: &Path, perms: &SocketPerms) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let uid = perms.owner.as_deref().map(|o| lookup_id(o, "/etc/passwd", "user")).transpose()?;
    let gid = perms.group.as_deref().map(|g| lookup_id(g, "/etc/group", "group")).transpose()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| invalid(format!("{} is not a socket path", path.display())))?;
    let private = parent.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("s");
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(perms.mode))?;
        if uid.is_some() || gid.is_some() {
            rustix::fs::chown(&tmp, uid.map(rustix::fs::Uid::from_raw), gid.map(rustix::fs::Gid::from_raw))?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// A user or group id: a number, or a name looked up in `db` (`/etc/passwd` or `/etc/group`:
/// `name:password:id:...`). Names served only by NSS modules (LDAP, ...) need the numeric id.
pub fn lookup_id(who: &str, db: &str, what: &str) -> std::io::Result<u32> {
    let id = match who.parse::<u32>() {
        Ok(id) => id,
        Err(_) => {
            let text = std::fs::read_to_string(db)?;
            text.lines()
                .filter_map(|line| {
                    let mut f = line.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse::<u32>().ok()?;
                    (name == who).then_some(id)
                })
                .next()
                .ok_or_else(|| invalid(format!("no {what} named {who:?} in {db}")))?
        }
    };
    if id == u32::MAX {
        return Err(invalid(format!("{what} id {id} is not valid")));
    }
    Ok(id)
}

/// Runs the listeners until `shutdown` turns true, then waits for every connection to drain.
pub async fn run(listeners: Vec<Listener>, catalog: Catalog, opts: ServerOptions, shutdown: watch::Receiver<bool>) {
    let cap = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    let workers = match Workers::per_core(opts.io_threads) {
        Ok(w) => {
            tracing::info!(connection_threads = w.len(), io_threads = w.io_threads(), "connection threads started");
            Some(Arc::new(w))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the connection threads; serving on the main runtime");
            None
        }
    };
    for l in listeners {
        let ctx = AcceptCtx {
            catalog: catalog.clone(),
            opts: opts.clone(),
            cap: cap.clone(),
            shutdown: shutdown.clone(),
            done: done_tx.clone(),
        };
        tasks.push(tokio::spawn(accept_loop(l, ctx, workers.clone())));
    }
    drop(done_tx);
    for t in tasks {
        let _ = t.await;
    }
    // Every connection task holds a clone of done_tx; recv returns None once all are gone.
    let _ = done_rx.recv().await;
    // Stops the connection threads, now idle; joining them is quick.
    drop(workers);
}

/// Connections refused at the connection cap, since start.
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Handshakes that ended in an error (protocol, TLS or I/O), since start.
static HANDSHAKE_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Handshakes that ran past the handshake timeout, since start.
static HANDSHAKE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);
/// The log lines for those: anyone who can reach a listener can make them. One a second,
/// standing for the events since the line before ([`logged_events`]).
static REFUSED_LOG: RateLimit = RateLimit::new(1, Duration::from_secs(1));
static HANDSHAKE_LOG: RateLimit = RateLimit::new(1, Duration::from_secs(1));
/// Client connections logged at info (connected, then disconnected) per second; the others
/// at debug, and counted in one line when the next second's first connection is logged. A
/// client that completes handshakes in a loop (a script, or anyone a Unix socket or a TCP
/// listener without TLS admits) could otherwise write two lines per connection.
pub const CONNECTION_LOG_BURST: u32 = 16;
static CONNECTION_LOG: RateLimit = RateLimit::new(CONNECTION_LOG_BURST, Duration::from_secs(1));

/// Counts of connections that never got to the transmission phase, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCounters {
    /// Refused at the connection cap.
    pub refused: u64,
    /// Handshakes that failed (bad option data, a TLS failure, a reset).
    pub handshake_errors: u64,
    /// Handshakes that took longer than the handshake timeout.
    pub handshake_timeouts: u64,
}

/// The counters since the process started (every server in it).
pub fn connection_counters() -> ConnectionCounters {
    ConnectionCounters {
        refused: REFUSED.load(Ordering::Relaxed),
        handshake_errors: HANDSHAKE_ERRORS.load(Ordering::Relaxed),
        handshake_timeouts: HANDSHAKE_TIMEOUTS.load(Ordering::Relaxed),
    }
}

/// Counts one event under a one-line-a-second limit: `Some(n)` when this one is to be logged,
/// `n` being the events since the last line (this one included: each window's first event is
/// the one logged, so the rest of that window is what its next line stands for too).
fn logged_events(limit: &RateLimit) -> Option<u64> {
    let admit = limit.admit(Instant::now());
    admit.log.then(|| admit.suppressed_before.unwrap_or(0) + 1)
}

#[derive(Clone)]
struct AcceptCtx {
    catalog: Catalog,
    opts: ServerOptions,
    cap: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
}

async fn accept_loop(listener: Listener, mut ctx: AcceptCtx, workers: Option<Arc<Workers>>) {
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
            REFUSED.fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = logged_events(&REFUSED_LOG) {
                let cap = ctx.opts.max_connections;
                tracing::warn!(%peer, max_connections = cap, refused, "connection refused: connection limit reached");
            }
            continue; // dropping the stream closes it
        };
        let c = ctx.clone();
        let Some(workers) = workers.as_ref() else {
            tokio::spawn(serve_connection(stream, peer, permit, c));
            continue;
        };
        // Off this runtime's I/O driver, onto the chosen thread's.
        match stream.into_std() {
            Ok(s) => workers.spawn(move || async move {
                match Stream::from_std(s) {
                    Ok(stream) => serve_connection(stream, peer, permit, c).await,
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot move the connection to its thread"),
                }
            }),
            Err(e) => tracing::warn!(%peer, error = %e, "cannot move the connection to its thread"),
        }
    }
}

/// One connection, from the greeting to the end.
async fn serve_connection(stream: Stream, peer: String, permit: OwnedSemaphorePermit, c: AcceptCtx) {
    let _permit = permit;
    let _done = c.done.clone();
    match stream {
        Stream::Tcp(s) => {
            let _ = s.set_nodelay(true);
            let tls = TlsState { mode: c.opts.tls.mode, active: false };
            connection(s, peer, tls, Transport::Tcp, c).await
        }
        Stream::Unix(s) => {
            // Room for a whole large reply per write: fewer partial writes and
            // wake-ups (the kernel caps it at net.core.wmem_max).
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, UNIX_SNDBUF);
            connection(s, peer, TlsState::OFF, Transport::Unix, c).await
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A [`Stream`] registered with no runtime, on its way to another one.
enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    fn into_std(self) -> std::io::Result<StdStream> {
        match self {
            Stream::Tcp(s) => s.into_std().map(StdStream::Tcp),
            Stream::Unix(s) => s.into_std().map(StdStream::Unix),
        }
    }

    /// Registers `s` with the current runtime (it is still non-blocking).
    fn from_std(s: StdStream) -> std::io::Result<Stream> {
        match s {
            StdStream::Tcp(s) => tokio::net::TcpStream::from_std(s).map(Stream::Tcp),
            StdStream::Unix(s) => tokio::net::UnixStream::from_std(s).map(Stream::Unix),
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(t) => t.accept().await.map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(u, p) => u.accept().await.map(|(s, _)| {
            // The peer's pid tells connections on one socket apart (nbd-client -C N).
            let pid = s.peer_cred().ok().and_then(|c| c.pid()).map(|p| format!(" pid {p}")).unwrap_or_default();
            let peer = format!("unix:{}{pid}", p.display());
            (Stream::Unix(s), peer)
        }),
    }
}

/// Why a connection ended before transmission.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("client asked for STARTTLS but no TLS acceptor is configured")]
    NoAcceptor,
}

/// Where the handshake left the connection.
enum Ready<S> {
    Plain(S, Negotiated),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Negotiated),
    Closed,
}

async fn handshake<S>(mut stream: S, tls: TlsState, ctx: &AcceptCtx) -> Result<Ready<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flags = handshake::greet(&mut stream).await?;
    match handshake::haggle(&mut stream, &ctx.catalog, flags, tls, &ctx.shutdown).await? {
        Outcome::Transmission(neg) => Ok(Ready::Plain(stream, neg)),
        Outcome::Abort => Ok(Ready::Closed),
        Outcome::StartTls => {
            let acceptor = ctx.opts.tls.acceptor().ok_or(ConnectError::NoAcceptor)?;
            let mut tls_stream = acceptor.accept(stream).await.map_err(ConnectError::Tls)?;
            let tls = TlsState { mode: tls.mode, active: true };
            match handshake::haggle(&mut tls_stream, &ctx.catalog, flags, tls, &ctx.shutdown).await? {
                Outcome::Transmission(neg) => Ok(Ready::Tls(Box::new(tls_stream), neg)),
                // StartTls is refused once TLS is active, so only Abort is left.
                Outcome::Abort | Outcome::StartTls => Ok(Ready::Closed),
            }
        }
    }
}

async fn connection<S>(stream: S, peer: String, tls: TlsState, transport: Transport, ctx: AcceptCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = ctx.shutdown.clone();
    let grace = ctx.opts.limits.shutdown_grace;
    let ready = tokio::select! {
        r = tokio::time::timeout(ctx.opts.handshake_timeout, handshake(stream, tls, &ctx)) => r,
        _ = async { let _ = shutdown.wait_for(|s| *s).await; tokio::time::sleep(grace).await } => {
            tracing::info!(%peer, "handshake abandoned: the server is shutting down");
            return;
        }
    };
    let ready = match ready {
        Err(_) => {
            HANDSHAKE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            if let Some(failures) = logged_events(&HANDSHAKE_LOG) {
                tracing::info!(%peer, failures, "handshake timed out");
            }
            return;
        }
        Ok(Err(e)) => {
            HANDSHAKE_ERRORS.fetch_add(1, Ordering::Relaxed);
            if let Some(failures) = logged_events(&HANDSHAKE_LOG) {
                tracing::info!(%peer, failures, error = %error_chain(&e), "handshake failed");
            }
            return;
        }
        Ok(Ok(r)) => r,
    };
    match ready {
        Ready::Closed => {}
        Ready::Plain(s, neg) => transmit(s, neg, &peer, false, transport, &ctx).await,
        Ready::Tls(s, neg) => transmit(*s, neg, &peer, true, transport, &ctx).await,
    }
}

async fn transmit<S>(stream: S, neg: Negotiated, peer: &str, tls: bool, transport: Transport, ctx: &AcceptCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let export = neg.export.name().to_owned();
    let exp = neg.export.clone();
    let client = exp.metrics().connection_opened(peer);
    let admit = CONNECTION_LOG.admit(Instant::now());
    if let Some(n) = admit.suppressed_before {
        tracing::info!(connections = n, per_second = CONNECTION_LOG_BURST, "client connections logged at debug only");
    }
    let (structured, extended) = (neg.structured_replies, neg.extended_headers);
    if admit.log {
        tracing::info!(%peer, %export, structured, extended, tls, "client connected");
    } else {
        tracing::debug!(%peer, %export, structured, extended, tls, "client connected");
    }
    let (r, w) = tokio::io::split(stream);
    let result = transmission::serve(r, w, neg, ctx.opts.limits, transport, ctx.shutdown.clone()).await;
    // A connection's two lines go to the same level.
    match (result, admit.log) {
        (Ok(()), true) => tracing::info!(%peer, %export, "client disconnected"),
        (Ok(()), false) => tracing::debug!(%peer, %export, "client disconnected"),
        (Err(e), true) => tracing::info!(%peer, %export, error = %error_chain(&e), "connection closed"),
        (Err(e), false) => tracing::debug!(%peer, %export, error = %error_chain(&e), "connection closed"),
    }
    exp.metrics().connection_closed(client);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_need_no_lookup() {
        assert_eq!(lookup_id("1234", "/nonexistent", "user").unwrap(), 1234);
    }

    #[test]
    fn names_are_looked_up_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("passwd");
        std::fs::write(&db, "root:x:0:0:root:/root:/bin/sh\nnbd:x:4242:4242::/:/bin/false\n").unwrap();
        let db = db.to_str().unwrap();
        assert_eq!(lookup_id("nbd", db, "user").unwrap(), 4242);
        assert!(lookup_id("nobody-here", db, "user").is_err());
    }

    #[test]
    fn id_minus_one_is_refused() {
        assert!(lookup_id("4294967295", "/nonexistent", "group").is_err());
    }

    #[tokio::test]
    async fn unix_socket_gets_its_mode_before_it_appears() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let perms = SocketPerms { mode: 0o640, owner: None, group: None };
        let l = Listener::bind(&ListenAddr::Unix { path: path.clone(), perms }).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        // Only the socket is left beside it: the private directory is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(l);
        assert!(!path.exists());
    }
}
