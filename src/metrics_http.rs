//! The metrics endpoint: a minimal HTTP/1.1 server on tokio that answers `GET /metrics` with
//! the Prometheus text format, 404 for any other path, 405 for any other method, and closes
//! the connection after each response (a Prometheus scrape opens one per interval anyway).
//!
//! Hand-written rather than hyper/axum: the daemon needs one route, and the bounds are easier
//! to see here: a request head of at most [`MAX_REQUEST_HEAD`] bytes read within
//! [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] scrapes at once, and no request body read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 8192;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 8;

/// Renders the metrics text on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A running endpoint; stopped when dropped or by [`MetricsServer::stop`].
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves in a background task.
    pub async fn start(addr: SocketAddr, render: Render) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, render, stopped));
        Ok(MetricsServer { addr, stop, task })
    }

    /// The bound address (with the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the listener to close (the port is free afterwards).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = (&mut { self }.task).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(listener: TcpListener, render: Render, mut stopped: watch::Receiver<bool>) {
    let cap = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return,
            p = cap.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let render = render.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(stream, &render).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut stream, "408 Request Timeout", "text/plain", "").await,
    };
    let line = head.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let body = render();
            respond(&mut stream, "200 OK", crate::metrics::CONTENT_TYPE, &body).await
        }
        ("HEAD", "/metrics") => respond(&mut stream, "200 OK", crate::metrics::CONTENT_TYPE, "").await,
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found; try /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

/// Reads up to the blank line that ends the request head; `None` if it is longer than
/// [`MAX_REQUEST_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut n = 0;
    loop {
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].windows(2).any(|w| w == b"\n\n") {
            buf.truncate(n);
            return Ok(Some(buf));
        }
        if n == buf.len() {
            return Ok(None);
        }
        let r = stream.read(&mut buf[n..]).await?;
        if r == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n += r;
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn server() -> MetricsServer {
        MetricsServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(|| "m 1\n".to_owned())).await.unwrap()
    }

    #[tokio::test]
    async fn get_metrics_returns_the_rendered_text() {
        let s = server().await;
        let r = get(s.addr(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nm 1\n"), "{r}");
    }

    #[tokio::test]
    async fn other_paths_are_404() {
        let s = server().await;
        let r = get(s.addr(), "GET / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let s = server().await;
        // Exactly the limit and no blank line: the server has read it all when it answers, so
        // closing does not reset the connection before the client reads the reply.
        let prefix = "GET /metrics HTTP/1.1\r\nX: ";
        let big = format!("{prefix}{}", "a".repeat(MAX_REQUEST_HEAD - prefix.len()));
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        let _ = c.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"));
    }

    #[tokio::test]
    async fn stop_frees_the_port() {
        let s = server().await;
        let addr = s.addr();
        s.stop().await;
        TcpListener::bind(addr).await.unwrap();
    }
}
