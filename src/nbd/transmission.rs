//! The transmission phase of one connection.
//!
//! One reader (this task) decodes requests, bounds them, and hands each to the blocking pool;
//! the I/O runs there (pread/pwrite + cipher) and sends its reply down a channel to one
//! writer task that serialises replies (they may complete out of order, as the spec allows).
//! Two semaphores bound what a client can have in flight: a request count and a byte budget,
//! so a fast sender meets back-pressure instead of unbounded buffering.
//!
//! Two error tiers: a request that fails gets an errno in its reply and the connection goes
//! on; a protocol violation (bad magic, a payload larger than advertised) ends the connection.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::codec::{self, CodecError, Command, Request, REQUEST_LEN};
use super::handshake::Negotiated;
use super::proto;
use crate::export::{Export, ExportError, MAX_REQUEST};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight (read from the socket, not yet replied to).
    pub max_requests: usize,
    /// Payload bytes in flight (write payloads held plus read buffers allocated).
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_requests: 128, max_bytes: 64 << 20 }
    }
}

/// Byte budget granularity: permits count 4 KiB units.
const UNIT_SHIFT: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("protocol violation")]
    Protocol(#[from] CodecError),
    #[error("write payload of {len} bytes exceeds the advertised maximum {max}")]
    PayloadTooLarge { len: u32, max: u32 },
}

enum Body {
    Ok,
    Data(Vec<u8>),
    Err(ExportError),
    Errno(u32, &'static str),
}

struct Reply {
    cookie: u64,
    offset: u64,
    body: Body,
}

/// Serves requests until the client disconnects, sends DISC, or `shutdown` turns true; then
/// waits for every request in flight to be replied to.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    neg: Negotiated,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = neg.export;
    let structured = neg.structured_replies;
    let (tx, rx) = mpsc::channel::<Reply>(limits.max_requests.max(1));
    let writer_task = tokio::spawn(write_replies(writer, rx, structured));
    let requests = Arc::new(Semaphore::new(limits.max_requests.max(1)));
    let byte_units = (limits.max_bytes >> UNIT_SHIFT).max((MAX_REQUEST as usize >> UNIT_SHIFT) + 1);
    let bytes = Arc::new(Semaphore::new(byte_units));

    let result = loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
            r = reader.read_exact(&mut hdr) => r,
        };
        match read {
            Ok(_) => {}
            // The client went away between requests: not an error worth more than debug.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match codec::decode_request(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == Command::Disc {
            break Ok(());
        }
        // Permits are taken before the payload is read or a buffer allocated: back-pressure.
        let Ok(req_permit) = requests.clone().acquire_owned().await else { break Ok(()) };
        let payload_len = match req.command {
            Command::Write | Command::Read => req.len,
            _ => 0,
        };
        let started = Instant::now();
        if payload_len > MAX_REQUEST {
            if req.command == Command::Write {
                // The payload cannot be skipped safely without reading it all.
                break Err(TransmissionError::PayloadTooLarge { len: req.len, max: MAX_REQUEST });
            }
            let r = Reply {
                cookie: req.cookie,
                offset: req.offset,
                body: Body::Err(ExportError::TooLarge { len: u64::from(req.len), max: MAX_REQUEST }),
            };
            export.metrics().request_started();
            account(&export, &req, &r.body, started);
            if tx.send(r).await.is_err() {
                break Ok(());
            }
            continue;
        }
        let units = ((payload_len as usize) >> UNIT_SHIFT) as u32 + 1;
        let Ok(byte_permit) = bytes.clone().acquire_many_owned(units).await else { break Ok(()) };
        let mut payload = Vec::new();
        if req.command == Command::Write {
            payload.resize(req.len as usize, 0);
            if let Err(e) = reader.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        dispatch(&export, req, payload, structured, tx.clone(), (req_permit, byte_permit), started);
    };
    // Drain: the writer ends when the last in-flight job drops its sender.
    drop(tx);
    let written = writer_task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result?;
    written?;
    Ok(())
}

/// Flags each command may carry; anything else gets EINVAL.
fn allowed_flags(cmd: Command, structured: bool) -> u16 {
    match cmd {
        Command::Read if structured => proto::CMD_FLAG_DF,
        Command::Write | Command::Trim => proto::CMD_FLAG_FUA,
        Command::WriteZeroes => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
        _ => 0,
    }
}

fn dispatch(
    export: &Arc<Export>,
    req: Request,
    payload: Vec<u8>,
    structured: bool,
    tx: mpsc::Sender<Reply>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    started: Instant,
) {
    let reply = move |body| Reply { cookie: req.cookie, offset: req.offset, body };
    export.metrics().request_started();
    if req.flags & !allowed_flags(req.command, structured) != 0 {
        let body = Body::Errno(proto::EINVAL, "unsupported command flags");
        account(export, &req, &body, started);
        let _ = tx.try_send(reply(body));
        return;
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let metered = export.clone();
    let export = export.clone();
    let counted = export.clone();
    let job = move || -> Body {
        let len = u64::from(req.len);
        let r = match req.command {
            Command::Read => {
                if let Err(e) = export.validate_read(req.offset, len) {
                    return Body::Err(e);
                }
                let mut buf = vec![0u8; req.len as usize];
                return match export.read(req.offset, &mut buf) {
                    Ok(()) => Body::Data(buf),
                    Err(e) => Body::Err(e),
                };
            }
            Command::Write => export.write(req.offset, payload, fua),
            Command::Flush => export.flush(),
            Command::Trim => export.trim(req.offset, len, fua),
            Command::WriteZeroes => {
                let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
                export.write_zeroes(req.offset, len, fua, fast)
            }
            // The data is on a local disk behind the page cache: validating the range is all
            // a prefetch hint needs.
            Command::Cache => export.validate_read(req.offset, len),
            Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                return Body::Errno(proto::EINVAL, "unsupported command");
            }
        };
        match r {
            Ok(()) => Body::Ok,
            Err(e) => Body::Err(e),
        }
    };
    tokio::task::spawn_blocking(move || {
        let body = job();
        account(&metered, &req, &body, started);
        if let Body::Err(e) = &body {
            counted.record_error(e);
        }
        // The writer may be gone (client disconnected); the reply is then moot.
        let _ = tx.blocking_send(reply(body));
        drop(permits);
    });
}

/// The reply status is decided: count the request in the export's metrics, and log a failure
/// (debug; warn, rate-limited, when it is the server's fault).
fn account(export: &Export, req: &Request, body: &Body, started: Instant) {
    let m = export.metrics();
    let errno = match body {
        Body::Ok | Body::Data(_) => 0,
        Body::Err(e) => {
            m.log_failure(export.name(), req.command, req.offset, u64::from(req.len), e.fault(), e.errno(), e);
            e.errno()
        }
        Body::Errno(n, _) => *n,
    };
    m.request_done(req.command, u64::from(req.len), errno, started);
}

async fn write_replies<W>(writer: W, mut rx: mpsc::Receiver<Reply>, structured: bool) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let mut scratch = Vec::with_capacity(256);
    while let Some(reply) = rx.recv().await {
        write_one(&mut w, &reply, structured, &mut scratch).await?;
        // Batch small replies: flush only when nothing else is ready.
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.into_inner().shutdown().await.or(Ok(()))
}

async fn write_one<W>(
    w: &mut BufWriter<W>,
    reply: &Reply,
    structured: bool,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let (errno, msg) = match &reply.body {
        Body::Ok => (0, String::new()),
        Body::Data(data) => {
            if structured {
                w.write_all(&codec::offset_data_header(reply.cookie, reply.offset, data.len() as u32, true)).await?;
            } else {
                w.write_all(&codec::simple_reply(0, reply.cookie)).await?;
            }
            return w.write_all(data).await;
        }
        Body::Err(e) => (e.errno(), e.to_string()),
        Body::Errno(n, m) => (*n, (*m).to_string()),
    };
    if structured && errno != 0 {
        scratch.clear();
        codec::error_chunk(scratch, reply.cookie, errno, &msg, None, true);
        w.write_all(scratch).await
    } else {
        w.write_all(&codec::simple_reply(errno, reply.cookie)).await
    }
}
