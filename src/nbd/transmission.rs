//! The transmission phase of one connection.
//!
//! One reader (this task) decodes requests, bounds them, and hands each to the blocking pool;
//! the I/O runs there (pread/pwrite + cipher) and sends its reply down a channel to one
//! writer task that serialises replies (they may complete out of order, as the spec allows).
//! Two semaphores bound what a client can have in flight: a request count and a byte budget,
//! so a fast sender meets back-pressure instead of unbounded buffering.
//!
//! Two error tiers: a request that fails gets an errno in its reply and the connection goes
//! on; a protocol violation (bad magic, a write payload larger than advertised) ends the
//! connection. Unknown commands and flags are the first tier: `EINVAL`, after the payload of a
//! WRITE has been read (so the stream stays in step).
//!
//! Both permits of a request are held until its reply has been written to the socket, so a
//! client that does not read its replies stops being read from (the reply queue cannot grow
//! past the request cap, and read buffers count against the byte budget until sent).
//!
//! Replies take one of three forms, fixed by negotiation: simple; structured (chunks for reads
//! and errors); extended (`EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths, and every
//! reply a 32-byte-header chunk echoing the request's offset).
//!
//! Shutdown (`doc/proto.md`, "Terminating the transmission phase"): once the flag turns, the
//! requests in flight finish normally; requests that arrive during a grace period get
//! `NBD_ESHUTDOWN` (a WRITE's payload is read and dropped), which tells the client to
//! disconnect; then the connection closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::codec::{self, CodecError, Command, ExtendedRequest, EXTENDED_REQUEST_LEN, REQUEST_LEN};
use super::handshake::Negotiated;
use super::proto;
use crate::export::{Export, ExportError, MAX_REQUEST};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight (read from the socket, reply not yet written).
    pub max_requests: usize,
    /// Payload bytes in flight (write payloads held plus read buffers not yet sent). Never
    /// less than one maximum-size request.
    pub max_bytes: usize,
    /// After shutdown starts, how long new requests are still read (and answered
    /// `NBD_ESHUTDOWN`) before the connection is closed.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_requests: 128, max_bytes: 64 << 20, shutdown_grace: Duration::from_secs(2) }
    }
}

/// Byte budget granularity: permits count 4 KiB units.
const UNIT_SHIFT: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// The stream failed.
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    /// A request header had a bad magic.
    #[error("protocol violation")]
    Protocol(#[from] CodecError),
    /// A WRITE announced more payload than the advertised maximum.
    #[error("write payload of {len} bytes exceeds the advertised maximum {max}")]
    PayloadTooLarge { len: u64, max: u32 },
    /// The stream ended inside a request header.
    #[error("connection closed in the middle of a request header")]
    TruncatedHeader,
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
    len: u64,
    body: Body,
    /// Released once the reply is written (or dropped with it).
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// How replies are framed, fixed by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Simple replies only.
    Simple,
    /// Structured reply chunks for reads and errors, simple replies otherwise.
    Structured,
    /// Extended headers: 32-byte requests, and every reply an extended chunk.
    Extended,
}

impl Format {
    fn of(neg: &Negotiated) -> Format {
        if neg.extended_headers {
            Format::Extended
        } else if neg.structured_replies {
            Format::Structured
        } else {
            Format::Simple
        }
    }

    fn header_len(self) -> usize {
        match self {
            Format::Extended => EXTENDED_REQUEST_LEN,
            Format::Simple | Format::Structured => REQUEST_LEN,
        }
    }

    fn decode(self, hdr: &[u8; EXTENDED_REQUEST_LEN]) -> Result<ExtendedRequest, CodecError> {
        match self {
            Format::Extended => codec::decode_extended_request(hdr),
            Format::Simple | Format::Structured => {
                let compact = hdr.first_chunk::<REQUEST_LEN>().ok_or(CodecError::Invalid("short header"))?;
                codec::decode_request(compact).map(ExtendedRequest::from)
            }
        }
    }

    /// The payload that follows a request header: a WRITE's length; with extended headers,
    /// also the length of any request flagged `NBD_CMD_FLAG_PAYLOAD_LEN`. The extension says a
    /// WRITE MUST carry that flag, but qemu's client (10.0) sends WRITE without it, and qemu's
    /// server takes a WRITE's length as its payload either way: so does this one.
    fn payload_len(self, req: &ExtendedRequest) -> Option<u64> {
        let flagged = self == Format::Extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0;
        (req.command == Command::Write || flagged).then_some(req.len)
    }
}

/// What waiting for the next request header gave.
enum Next {
    Header([u8; EXTENDED_REQUEST_LEN]),
    /// The client closed cleanly between requests.
    Eof,
    /// Shutdown was signalled (only reported once, before the grace period).
    Shutdown,
    /// The grace period after shutdown is over.
    GraceOver,
}

/// Reads one request header, cancel-safely: partial reads are kept in `hdr`/`filled`, so a
/// shutdown signal arriving mid-header loses nothing.
async fn next_header<R>(
    reader: &mut R,
    len: usize,
    shutdown: &mut watch::Receiver<bool>,
    deadline: Option<Instant>,
) -> Result<Next, TransmissionError>
where
    R: AsyncRead + Unpin,
{
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    let len = len.min(EXTENDED_REQUEST_LEN);
    let mut filled = 0;
    while filled < len {
        let n = match deadline {
            None => tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s), if filled == 0 => return Ok(Next::Shutdown),
                r = reader.read(&mut hdr[filled..len]) => r?,
            },
            Some(d) => tokio::select! {
                biased;
                _ = tokio::time::sleep_until(d) => return Ok(Next::GraceOver),
                r = reader.read(&mut hdr[filled..len]) => r?,
            },
        };
        if n == 0 {
            return if filled == 0 { Ok(Next::Eof) } else { Err(TransmissionError::TruncatedHeader) };
        }
        filled += n;
    }
    Ok(Next::Header(hdr))
}

/// Serves requests until the client disconnects or sends DISC, or shutdown's grace period
/// ends; then waits for every request in flight to be replied to.
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
    let format = Format::of(&neg);
    let export = neg.export;
    // Unbounded, yet bounded: every reply holds a request permit until it is written.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx, format));
    let requests = Arc::new(Semaphore::new(limits.max_requests.max(1)));
    let byte_units = (limits.max_bytes >> UNIT_SHIFT).max((MAX_REQUEST as usize >> UNIT_SHIFT) + 1);
    let bytes = Arc::new(Semaphore::new(byte_units));
    let mut deadline: Option<Instant> = None;

    let result = loop {
        let hdr = match next_header(&mut reader, format.header_len(), &mut shutdown, deadline).await {
            Ok(Next::Header(h)) => h,
            Ok(Next::Eof) | Ok(Next::GraceOver) => break Ok(()),
            Ok(Next::Shutdown) => {
                deadline = Some(Instant::now() + limits.shutdown_grace);
                continue;
            }
            Err(e) => break Err(e),
        };
        let req = match format.decode(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == Command::Disc {
            break Ok(());
        }
        let payload_len = format.payload_len(&req);
        if let Some(len) = payload_len.filter(|&l| l > u64::from(MAX_REQUEST)) {
            // The payload cannot be skipped without reading it all; the spec allows a hard
            // disconnect for a payload over the advertised maximum.
            break Err(TransmissionError::PayloadTooLarge { len, max: MAX_REQUEST });
        }
        // The request permit comes before the payload is read or a buffer allocated:
        // back-pressure. After shutdown, waiting is bounded by the grace period.
        let req_permit = match deadline {
            None => requests.clone().acquire_owned().await,
            Some(d) => match tokio::time::timeout_at(d, requests.clone().acquire_owned()).await {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let Ok(req_permit) = req_permit else { break Ok(()) };
        let reply =
            |body, permits| Reply { cookie: req.cookie, offset: req.offset, len: req.len, body, _permits: permits };

        if let Some(d) = deadline {
            // Shutting down: consume the payload, answer ESHUTDOWN, keep the stream in step.
            if let Some(len) = payload_len {
                let mut payload = (&mut reader).take(len);
                let mut sink = tokio::io::sink();
                match tokio::time::timeout_at(d, tokio::io::copy(&mut payload, &mut sink)).await {
                    Ok(Ok(n)) if n == len => {}
                    Ok(Ok(_)) => break Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Ok(()),
                }
            }
            let permits = Permits { _request: req_permit, _bytes: None };
            let body = Body::Errno(proto::ESHUTDOWN, "the server is shutting down");
            if tx.send(reply(body, permits)).is_err() {
                break Ok(());
            }
            continue;
        }

        // Bytes held for this request: its payload, or the buffer of a read. Both are at most
        // MAX_REQUEST (checked above; longer reads are refused without a buffer).
        let held = match (payload_len, req.command) {
            (Some(len), _) => len,
            (None, Command::Read) if req.len <= u64::from(MAX_REQUEST) => req.len,
            (None, _) => 0,
        };
        let units = (held >> UNIT_SHIFT) as u32 + 1;
        let Ok(byte_permit) = bytes.clone().acquire_many_owned(units).await else { break Ok(()) };
        let mut payload = Vec::new();
        if let Some(len) = payload_len {
            payload.resize(len as usize, 0);
            if let Err(e) = reader.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        let permits = Permits { _request: req_permit, _bytes: Some(byte_permit) };
        if let Some(refusal) = refuse(&req, format) {
            tracing::debug!(?req, "request refused");
            if tx.send(reply(refusal, permits)).is_err() {
                break Ok(());
            }
            continue;
        }
        dispatch(&export, req, payload, tx.clone(), permits);
    };
    // Drain: the writer ends when the last in-flight job drops its sender.
    drop(tx);
    let written = writer_task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result?;
    written?;
    Ok(())
}

/// Flags each command may carry; anything else gets EINVAL. FUA is accepted on every
/// command: the spec notes that existing clients set it on commands that do not write, and
/// lets the server ignore it there. With extended headers only WRITE takes a payload.
fn allowed_flags(cmd: Command, format: Format) -> u16 {
    let chunked = format != Format::Simple;
    proto::CMD_FLAG_FUA
        | match cmd {
            Command::Read if chunked => proto::CMD_FLAG_DF,
            Command::Write if format == Format::Extended => proto::CMD_FLAG_PAYLOAD_LEN,
            Command::WriteZeroes => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
            _ => 0,
        }
}

/// Largest effect length of a WRITE_ZEROES (64-bit with extended headers): zeroes are
/// encrypted and written like data, so one request is capped at what a compact header can
/// ask for; the spec allows refusing larger ones.
const MAX_ZERO_LEN: u64 = u32::MAX as u64;

/// Requests answered without touching the export: unknown commands, commands this server
/// does not offer, flags not valid for the command (a payload on anything but a WRITE), reads
/// over the maximum payload, zeroes over [`MAX_ZERO_LEN`].
fn refuse(req: &ExtendedRequest, format: Format) -> Option<Body> {
    match req.command {
        Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            return Some(Body::Errno(proto::EINVAL, "unsupported command"));
        }
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Cache | Command::WriteZeroes => {}
    }
    if req.flags & !allowed_flags(req.command, format) != 0 {
        return Some(Body::Errno(proto::EINVAL, "unsupported command flags"));
    }
    if req.command == Command::Read && req.len > u64::from(MAX_REQUEST) {
        return Some(Body::Err(ExportError::TooLarge { len: req.len, max: MAX_REQUEST }));
    }
    if req.command == Command::WriteZeroes && req.len > MAX_ZERO_LEN {
        return Some(Body::Err(ExportError::TooLarge { len: req.len, max: u32::MAX }));
    }
    None
}

fn dispatch(
    export: &Arc<Export>,
    req: ExtendedRequest,
    payload: Vec<u8>,
    tx: mpsc::UnboundedSender<Reply>,
    permits: Permits,
) {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let started = std::time::Instant::now();
    export.metrics().request_started();
    let metered = export.clone();
    let export = export.clone();
    let job = move || -> Body {
        let len = req.len;
        let r = match req.command {
            Command::Read => {
                if let Err(e) = export.validate_read(req.offset, len) {
                    return Body::Err(e);
                }
                // At most MAX_REQUEST: longer reads are refused before dispatch.
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
            // Refused before dispatch (see `refuse`).
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
        // The writer may be gone (client disconnected); the reply is then moot.
        let _ = tx.send(Reply { cookie: req.cookie, offset: req.offset, len: req.len, body, _permits: permits });
    });
}

/// The reply status is decided: count the request in the export's metrics (and raw-volume
/// failures in its error counter), and log a failure (rate-limited at warn, see `metrics`).
fn account(export: &Export, req: &ExtendedRequest, body: &Body, started: std::time::Instant) {
    let m = export.metrics();
    let errno = match body {
        Body::Ok | Body::Data(_) => 0,
        Body::Err(e) => {
            export.record_error(e);
            m.log_failure(export.name(), req.command, req.offset, req.len, e.fault(), e.errno(), e);
            e.errno()
        }
        Body::Errno(n, _) => *n,
    };
    m.request_done(req.command, req.len, errno, started);
}

/// Whether an error concerns the data at the request's range (a structured reply then says
/// where, with `NBD_REPLY_TYPE_ERROR_OFFSET`) rather than the request itself. Exhaustive on
/// purpose, like [`ExportError::errno`].
fn is_data_error(e: &ExportError) -> bool {
    match e {
        ExportError::Io(_) | ExportError::NoSpace(_) | ExportError::Cipher(_) => true,
        // Not about the data at the range: the volume as a whole is unavailable.
        ExportError::ShuttingDown | ExportError::FlushFailedEarlier => false,
        ExportError::ReadOutOfRange { .. }
        | ExportError::WriteOutOfRange { .. }
        | ExportError::TrimOutOfRange { .. }
        | ExportError::ReadOnly
        | ExportError::TooLarge { .. }
        | ExportError::NotSupported(_) => false,
    }
}

async fn write_replies<W>(writer: W, mut rx: mpsc::UnboundedReceiver<Reply>, format: Format) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let mut scratch = Vec::with_capacity(256);
    while let Some(reply) = rx.recv().await {
        write_one(&mut w, &reply, format, &mut scratch).await?;
        drop(reply); // releases its permits
                     // Batch small replies: flush only when nothing else is ready.
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.into_inner().shutdown().await.or(Ok(()))
}

async fn write_one<W>(w: &mut BufWriter<W>, reply: &Reply, format: Format, scratch: &mut Vec<u8>) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let (errno, msg, at) = match &reply.body {
        Body::Ok => (0, String::new(), None),
        Body::Data(data) if data.is_empty() && format != Format::Simple => {
            // A zero-length read: OFFSET_DATA must carry at least one byte, so just DONE.
            return match format {
                Format::Extended => w.write_all(&codec::extended_done_chunk(reply.cookie, reply.offset)).await,
                Format::Simple | Format::Structured => w.write_all(&codec::done_chunk(reply.cookie)).await,
            };
        }
        Body::Data(data) => {
            // One chunk, DONE set: the data is all read before the reply starts, so no error
            // can follow, and NBD_CMD_FLAG_DF is honoured whatever the length. At most
            // MAX_REQUEST bytes, so the length fits the chunk's 32 bits.
            let len = data.len() as u32;
            match format {
                Format::Simple => w.write_all(&codec::simple_reply(0, reply.cookie)).await?,
                Format::Structured => {
                    w.write_all(&codec::offset_data_header(reply.cookie, reply.offset, len, true)).await?
                }
                Format::Extended => {
                    w.write_all(&codec::extended_offset_data_header(reply.cookie, reply.offset, len, true)).await?
                }
            }
            return w.write_all(data).await;
        }
        Body::Err(e) => {
            // The failed I/O covered the whole range and nothing was sent for it: the first
            // byte is where the client can no longer assume success.
            let at = (is_data_error(e) && reply.len > 0).then_some(reply.offset);
            (e.errno(), e.to_string(), at)
        }
        Body::Errno(n, m) => (*n, (*m).to_string(), None),
    };
    match format {
        Format::Extended if errno == 0 => w.write_all(&codec::extended_done_chunk(reply.cookie, reply.offset)).await,
        Format::Extended => {
            scratch.clear();
            codec::extended_error_chunk(scratch, reply.cookie, reply.offset, errno, &msg, at, true);
            w.write_all(scratch).await
        }
        Format::Structured if errno != 0 => {
            scratch.clear();
            codec::error_chunk(scratch, reply.cookie, errno, &msg, at, true);
            w.write_all(scratch).await
        }
        Format::Simple | Format::Structured => w.write_all(&codec::simple_reply(errno, reply.cookie)).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::crypto::{SectorCipher, VolumeKey};
    use crate::export::{ExportOptions, Geometry};
    use crate::units::SectorSize;
    use tokio::io::duplex;

    fn negotiated(structured: bool) -> Negotiated {
        let ss = SectorSize::S4096;
        let key = VolumeKey::generate().unwrap();
        let opts =
            ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: false };
        let geo = Geometry { sector_size: ss, data_offset: 0, data_size: 1 << 20 };
        let mem = Arc::new(MemBackend::new(1 << 20));
        let export = Arc::new(Export::new(opts, geo, mem, SectorCipher::new(&key, ss).unwrap()));
        Negotiated { export, structured_replies: structured, extended_headers: false }
    }

    fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
        codec::Request { flags: 0, command: Command::from(cmd), cookie, offset, len }.encode()
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_replies_stops_being_read() {
        let (client, server) = duplex(4096);
        let (r, w) = tokio::io::split(server);
        let (_tx, rx) = watch::channel(false);
        let limits = Limits { max_requests: 4, ..Limits::default() };
        let serve = tokio::spawn(serve(r, w, negotiated(false), limits, rx));
        // 200 reads of 4 KiB: far more replies than the pipe holds.
        let mut wire = Vec::new();
        for i in 0..200u64 {
            wire.extend_from_slice(&request(proto::CMD_READ, i, 0, 4096));
        }
        let (mut cr, mut cw) = tokio::io::split(client);
        let sender = tokio::spawn(async move {
            cw.write_all(&wire).await.unwrap();
            cw
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!sender.is_finished(), "the server kept reading requests it could not answer");
        // Reading the replies lets everything through.
        let mut hdr = [0u8; 16];
        let mut data = vec![0u8; 4096];
        for _ in 0..200 {
            cr.read_exact(&mut hdr).await.unwrap();
            assert_eq!(&hdr[4..8], &[0, 0, 0, 0], "no error");
            cr.read_exact(&mut data).await.unwrap();
        }
        let cw = sender.await.unwrap();
        drop(cr.unsplit(cw));
        serve.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_answers_new_requests_eshutdown_then_closes() {
        let (mut client, server) = duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let (tx, rx) = watch::channel(false);
        let limits = Limits { shutdown_grace: Duration::from_millis(500), ..Limits::default() };
        let serve = tokio::spawn(serve(r, w, negotiated(false), limits, rx));
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut wire = request(proto::CMD_WRITE, 7, 0, 512).to_vec();
        wire.extend_from_slice(&[1; 512]);
        wire.extend_from_slice(&request(proto::CMD_FLUSH, 8, 0, 0));
        client.write_all(&wire).await.unwrap();
        for cookie in [7u64, 8] {
            let mut reply = [0u8; 16];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply, codec::simple_reply(proto::ESHUTDOWN, cookie), "cookie {cookie}");
        }
        // Then, after the grace period, the server closes without the client doing anything.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
        serve.await.unwrap().unwrap();
    }
}
