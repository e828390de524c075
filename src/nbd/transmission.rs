//! The transmission phase of one connection.
//!
//! One task per connection reads requests, serves those that need not wait for a device on
//! the spot, and writes the replies. Requests arrive in batches (one `read` into a 256 KiB
//! input buffer usually brings many headers, or a header with its payload); a read that hits
//! the page cache (`preadv2(RWF_NOWAIT)`) is decrypted in a pooled buffer, a page-aligned write
//! is encrypted in place in the input buffer and copied into the page cache, and the replies
//! of the whole batch leave in one vectored `write`. So a cached request costs its pread or
//! pwrite and a share of one read and one write: no thread hop, no channel, no allocation.
//!
//! Whatever may wait for a device goes to tokio's blocking pool: reads that miss the cache,
//! all I/O in `O_DIRECT` mode, FLUSH and FUA, TRIM, WRITE_ZEROES, writes that need
//! read-modify-write or whose range another write holds, and requests larger than
//! [`INLINE_MAX`], whose copy and crypto then run beside the connection (on another core).
//! Their replies come back through a channel and join the queue; replies may leave out of
//! order, as the spec allows.
//!
//! Two bounds keep a client from making the server buffer without limit: requests in flight
//! (read from the socket, reply not yet written) and their payload bytes. At either bound the
//! connection stops reading until replies drain. Buffers come from a per-connection pool and
//! return to it once their reply is written.
//!
//! Two error tiers: a request that fails gets an errno in its reply and the connection goes
//! on; a protocol violation (bad magic, a payload larger than advertised) ends the connection,
//! after the requests in flight are finished.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::codec::{self, CodecError, Command, Request, REQUEST_LEN};
use super::handshake::Negotiated;
use super::proto;
use crate::buf::{AlignedBuf, BufPool};
use crate::export::{Export, ExportError, ReadPlan, MAX_REQUEST};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight (read from the socket, reply not yet written).
    pub max_requests: usize,
    /// Payload bytes in flight (write payloads held plus read buffers not yet sent), and the
    /// limit of the connection's buffer pool. One request is always admitted, whatever its
    /// size. With the 256 KiB input buffer this bounds a connection's memory: a client that
    /// never reads its replies gets this much buffered, then the server stops reading.
    pub max_bytes: usize,
}

impl Default for Limits {
    /// 12 MiB: twelve 1 MiB or forty-eight 256 KiB requests in flight per connection (more
    /// than fio's QD8 or nbdcopy's default needs), and four connections stay under 64 MiB.
    fn default() -> Self {
        Limits { max_requests: 128, max_bytes: 12 << 20 }
    }
}

/// Requests up to this many bytes are served inline when they can be (see the module doc).
pub const INLINE_MAX: usize = 4 << 20;

/// Once this many reply bytes are queued, the connection writes them before serving more
/// requests: large replies leave one by one, so the client consumes one while the next is
/// read and decrypted; small ones still leave in batches.
const FLUSH_AT: usize = 256 << 10;

/// Size of the input buffer.
const INBUF: usize = 256 << 10;

/// Write payloads up to this size are gathered in the input buffer (and encrypted there);
/// larger ones are read straight into a pooled buffer of their own.
const GATHER_MAX: usize = 128 << 10;

/// Replies written by one vectored write, at most (two slices each): a queue depth of 32
/// small replies in one system call.
const MAX_BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("protocol violation")]
    Protocol(#[from] CodecError),
    #[error("write payload of {len} bytes exceeds the advertised maximum {max}")]
    PayloadTooLarge { len: u32, max: u32 },
}

/// Serves requests until the client disconnects, sends DISC, or `shutdown` turns true; then
/// finishes every request in flight and writes its reply.
pub async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    neg: Negotiated,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut conn = Conn {
        export: neg.export,
        structured: neg.structured_replies,
        budget: Budget { requests: 0, bytes: 0, limits },
        pool: BufPool::new(limits.max_bytes),
        out: Outbox::default(),
        jobs: 0,
        done_tx,
    };
    let mut inbuf = InBuf::new(INBUF);
    let mut pending: Option<Pending> = None;
    // One future for the whole connection: re-creating it per loop turn would register and
    // drop a waiter on the watch channel every time (a few percent of a busy connection's CPU).
    let stop = shutdown.wait_for(|s| *s);
    tokio::pin!(stop);
    // Reading stops for good on DISC, shutdown, end of stream or a connection error.
    let mut reading = true;
    let mut result: Result<(), TransmissionError> = Ok(());
    // After a failed write the client is gone: replies are dropped, not written.
    let mut write_failed = false;
    // The last write attempt found the socket full: serve requests meanwhile, up to the budget.
    let mut socket_full = false;

    loop {
        // Requests already received that could start once the queued replies are out.
        let mut more = false;
        if reading && pending.is_none() {
            let flush_at = if socket_full { usize::MAX } else { FLUSH_AT };
            match conn.take_requests(&mut inbuf, &mut pending, flush_at) {
                Ok(Step::Continue) => {}
                Ok(Step::Yield) => more = true,
                Ok(Step::Disc) => reading = false,
                Err(e) => {
                    result = Err(e);
                    reading = false;
                }
            }
        }
        if write_failed {
            conn.out.discard(&mut conn.pool, &mut conn.budget);
        } else if !conn.out.is_empty() {
            // Write what the socket takes now, without waiting for it.
            let now = std::future::poll_fn(|cx| {
                Poll::Ready(conn.out.poll_write(cx, &mut writer, &mut conn.pool, &mut conn.budget))
            });
            match now.await {
                Poll::Ready(Ok(())) => socket_full = false,
                Poll::Ready(Err(e)) => {
                    write_failed = true;
                    reading = false;
                    if result.is_ok() {
                        result = Err(e.into());
                    }
                    continue;
                }
                Poll::Pending => socket_full = true,
            }
        }
        if more {
            // Either the replies are out, or the socket is full and requests wait: both
            // mean serving the next requests now.
            continue;
        }
        if !reading && conn.jobs == 0 && conn.out.is_empty() {
            break;
        }
        let can_read = reading && (pending.is_some() || conn.budget.has_room());
        let can_write = !conn.out.is_empty();
        let has_jobs = conn.jobs > 0;
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| conn.out.poll_write(cx, &mut writer, &mut conn.pool, &mut conn.budget)), if can_write => {
                socket_full = false;
                if let Err(e) = r {
                    write_failed = true;
                    reading = false;
                    if result.is_ok() {
                        result = Err(e.into());
                    }
                }
            }
            Some(done) = done_rx.recv(), if has_jobs => conn.complete(done),
            _ = &mut stop, if reading => reading = false,
            r = read_some(&mut reader, &mut inbuf, &mut pending), if can_read => match r {
                Ok(0) => {
                    reading = false;
                    // EOF between requests (or inside a header: the client gave up) is a
                    // normal end; inside a write payload the stream is broken.
                    if pending.is_some() {
                        result = Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    pending = None;
                }
                Ok(n) => {
                    if let Some(p) = pending.as_mut() {
                        p.filled += n;
                        if p.filled == p.buf.len() {
                            if let Some(p) = pending.take() {
                                conn.run_write(p.req, WriteData::Owned(p.buf));
                            }
                        }
                    } else {
                        inbuf.end += n;
                    }
                }
                Err(e) => {
                    reading = false;
                    pending = None;
                    result = Err(e.into());
                }
            },
            else => break,
        }
    }
    result
}

/// Reads what the socket has into the pending payload, or else into the input buffer.
/// Cancel-safe: a read either happened (and is reported) or did not.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    inbuf: &mut InBuf,
    pending: &mut Option<Pending>,
) -> io::Result<usize> {
    match pending {
        Some(p) => reader.read(&mut p.buf[p.filled..]).await,
        None => {
            inbuf.compact();
            reader.read(inbuf.spare()).await
        }
    }
}

/// The input buffer: `buf[start..end]` holds received bytes not yet consumed.
struct InBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new(size: usize) -> InBuf {
        InBuf { buf: vec![0u8; size].into_boxed_slice(), start: 0, end: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves unconsumed bytes to the front when the free tail is too short for a gathered
    /// request (header plus up to [`GATHER_MAX`] payload).
    fn compact(&mut self) {
        if self.start > 0 && self.buf.len() - self.start < REQUEST_LEN + GATHER_MAX {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The free tail; never empty after [`InBuf::compact`] while waiting for a request.
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }
}

/// A WRITE whose payload is being read straight into its own buffer.
struct Pending {
    req: Request,
    buf: AlignedBuf,
    filled: usize,
}

enum Step {
    /// Wait for more input (or for room in the budget).
    Continue,
    /// Replies worth writing are queued; more requests are ready to start after that.
    Yield,
    /// The client sent DISC.
    Disc,
}

/// Requests and payload bytes in flight against the [`Limits`].
struct Budget {
    requests: usize,
    bytes: usize,
    limits: Limits,
}

impl Budget {
    fn has_room(&self) -> bool {
        self.requests < self.limits.max_requests.max(1) && self.bytes < self.limits.max_bytes.max(1)
    }

    /// Whether a request with `cost` payload bytes may start now.
    fn admits(&self, cost: usize) -> bool {
        self.requests == 0
            || (self.requests < self.limits.max_requests && self.bytes.saturating_add(cost) <= self.limits.max_bytes)
    }

    fn take(&mut self, cost: usize) {
        self.requests += 1;
        self.bytes += cost;
    }

    fn release(&mut self, cost: usize) {
        self.requests = self.requests.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(cost);
    }
}

/// Payload bytes a request holds while in flight (its read buffer or write payload).
fn cost(req: &Request) -> usize {
    match req.command {
        Command::Read | Command::Write if req.len <= MAX_REQUEST => req.len as usize,
        _ => 0,
    }
}

/// What a request's reply carries.
enum Body {
    Ok,
    /// `buf[skip..skip + len]` is the data.
    Data {
        buf: AlignedBuf,
        skip: usize,
        len: usize,
    },
    Err(ExportError),
    Errno(u32, &'static str),
}

impl Body {
    fn from_result(r: Result<(), ExportError>) -> Body {
        match r {
            Ok(()) => Body::Ok,
            Err(e) => Body::Err(e),
        }
    }
}

/// Work for the blocking pool.
enum Job {
    Read { plan: ReadPlan, buf: AlignedBuf },
    Write { buf: AlignedBuf },
    Flush,
    Trim,
    WriteZeroes,
}

/// A finished job: the reply, and a buffer to give back to the pool.
struct Done {
    req: Request,
    body: Body,
    spare: Option<AlignedBuf>,
}

/// A write payload: still in the input buffer, or in a buffer of its own.
enum WriteData<'a> {
    InBuf(&'a mut [u8]),
    Owned(AlignedBuf),
}

struct Conn {
    export: Arc<Export>,
    structured: bool,
    budget: Budget,
    pool: BufPool,
    out: Outbox,
    /// Requests on the blocking pool.
    jobs: usize,
    done_tx: mpsc::UnboundedSender<Done>,
}

impl Conn {
    /// Starts every complete request in the input buffer that the budget admits.
    /// Stops with [`Step::Yield`] when `flush_at` reply bytes are queued and the next request
    /// could start right away (so the caller's "more to do" never spins without progress).
    fn take_requests(
        &mut self,
        inbuf: &mut InBuf,
        pending: &mut Option<Pending>,
        flush_at: usize,
    ) -> Result<Step, TransmissionError> {
        loop {
            let Some(hdr) = inbuf.data().first_chunk::<REQUEST_LEN>() else { return Ok(Step::Continue) };
            let req = codec::decode_request(hdr)?;
            match req.command {
                Command::Disc => {
                    inbuf.consume(REQUEST_LEN);
                    return Ok(Step::Disc);
                }
                Command::Write if req.len > MAX_REQUEST => {
                    // The payload cannot be skipped without reading it all; the spec allows
                    // a hard disconnect for a payload over the advertised maximum.
                    return Err(TransmissionError::PayloadTooLarge { len: req.len, max: MAX_REQUEST });
                }
                _ => {}
            }
            let cost = cost(&req);
            if !self.budget.admits(cost) {
                return Ok(Step::Continue);
            }
            let len = req.len as usize;
            let gathered = req.command == Command::Write && len <= GATHER_MAX;
            if gathered && inbuf.data().len() < REQUEST_LEN + len {
                return Ok(Step::Continue);
            }
            // The request can start: first let queued replies go out if there are enough.
            if self.out.queued >= flush_at {
                return Ok(Step::Yield);
            }
            if req.command != Command::Write {
                inbuf.consume(REQUEST_LEN);
                self.budget.take(cost);
                self.start(req);
                continue;
            }
            if gathered {
                inbuf.consume(REQUEST_LEN);
                self.budget.take(cost);
                let start = inbuf.start;
                self.run_write(req, WriteData::InBuf(&mut inbuf.buf[start..start + len]));
                inbuf.consume(len);
                continue;
            }
            inbuf.consume(REQUEST_LEN);
            self.budget.take(cost);
            let mut buf = self.pool.get(len);
            let have = len.min(inbuf.data().len());
            buf[..have].copy_from_slice(&inbuf.data()[..have]);
            inbuf.consume(have);
            if have < len {
                *pending = Some(Pending { req, buf, filled: have });
                return Ok(Step::Continue);
            }
            self.run_write(req, WriteData::Owned(buf));
        }
    }

    /// Starts a request that has no payload.
    fn start(&mut self, req: Request) {
        if let Some(body) = refuse(&req, self.structured) {
            return self.reply(&req, body);
        }
        let len = u64::from(req.len);
        match req.command {
            Command::Read => {
                let plan = match self.export.plan_read(req.offset, len) {
                    Ok(p) => p,
                    Err(e) => return self.reply(&req, Body::Err(e)),
                };
                let mut buf = self.pool.get(plan.wide.len as usize);
                if self.export.cached() && plan.len <= INLINE_MAX {
                    match self.export.read_planned(&plan, &mut buf, true) {
                        Ok(true) => return self.reply(&req, Body::Data { buf, skip: plan.skip, len: plan.len }),
                        Ok(false) => {}
                        Err(e) => {
                            self.pool.put(buf);
                            return self.reply(&req, Body::Err(e));
                        }
                    }
                }
                self.dispatch(req, Job::Read { plan, buf });
            }
            // The data is on a local disk behind the page cache: validating the range is all
            // a prefetch hint needs.
            Command::Cache => {
                let body = Body::from_result(self.export.validate_read(req.offset, len));
                self.reply(&req, body);
            }
            Command::Flush => self.dispatch(req, Job::Flush),
            Command::Trim => self.dispatch(req, Job::Trim),
            Command::WriteZeroes => self.dispatch(req, Job::WriteZeroes),
            // Refused above; WRITE comes through `run_write`.
            Command::Write | Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                self.reply(&req, Body::Errno(proto::EINVAL, "unsupported command"));
            }
        }
    }

    /// Starts a WRITE whose payload has been read.
    fn run_write(&mut self, req: Request, data: WriteData<'_>) {
        if let Some(body) = refuse(&req, self.structured) {
            if let WriteData::Owned(buf) = data {
                self.pool.put(buf);
            }
            return self.reply(&req, body);
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let inline = self.export.cached() && req.len as usize <= INLINE_MAX;
        let buf = match data {
            WriteData::InBuf(payload) => {
                if inline {
                    match self.export.try_write(req.offset, payload, fua) {
                        Ok(true) => return self.reply(&req, Body::Ok),
                        Ok(false) => {}
                        Err(e) => return self.reply(&req, Body::Err(e)),
                    }
                }
                let mut buf = self.pool.get(payload.len());
                buf.copy_from_slice(payload);
                buf
            }
            WriteData::Owned(mut buf) => {
                if inline {
                    match self.export.try_write(req.offset, &mut buf, fua) {
                        Ok(true) => {
                            self.pool.put(buf);
                            return self.reply(&req, Body::Ok);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.pool.put(buf);
                            return self.reply(&req, Body::Err(e));
                        }
                    }
                }
                buf
            }
        };
        self.dispatch(req, Job::Write { buf });
    }

    /// Runs a job on the blocking pool; its reply comes back through `done_tx`.
    fn dispatch(&mut self, req: Request, job: Job) {
        self.jobs += 1;
        let export = self.export.clone();
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let (body, spare) = run_job(&export, &req, job);
            // The connection may be gone (it waits for its jobs, so only after a panic).
            let _ = tx.send(Done { req, body, spare });
        });
    }

    /// A job came back from the blocking pool.
    fn complete(&mut self, done: Done) {
        self.jobs = self.jobs.saturating_sub(1);
        if let Some(buf) = done.spare {
            self.pool.put(buf);
        }
        self.reply(&done.req, done.body);
    }

    /// The reply status of `req` is decided: queue the reply.
    fn reply(&mut self, req: &Request, body: Body) {
        let entry = encode_reply(req, body, self.structured);
        self.out.queued += entry.len();
        self.out.entries.push_back(entry);
    }
}

/// Requests answered without touching the export: unknown commands, commands this server
/// does not offer, flags not valid for the command, reads over the maximum payload.
fn refuse(req: &Request, structured: bool) -> Option<Body> {
    match req.command {
        Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            return Some(Body::Errno(proto::EINVAL, "unsupported command"));
        }
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Cache | Command::WriteZeroes => {}
    }
    if req.flags & !allowed_flags(req.command, structured) != 0 {
        return Some(Body::Errno(proto::EINVAL, "unsupported command flags"));
    }
    if req.command == Command::Read && req.len > MAX_REQUEST {
        return Some(Body::Err(ExportError::TooLarge { len: u64::from(req.len), max: MAX_REQUEST }));
    }
    None
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

/// Does a job on a blocking thread. Returns the reply and, if the job's buffer is not part
/// of the reply, the buffer (for the pool).
fn run_job(export: &Export, req: &Request, job: Job) -> (Body, Option<AlignedBuf>) {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    let r = match job {
        Job::Read { plan, mut buf } => {
            return match export.read_planned(&plan, &mut buf, false) {
                Ok(_) => (Body::Data { buf, skip: plan.skip, len: plan.len }, None),
                Err(e) => (Body::Err(e), Some(buf)),
            };
        }
        Job::Write { mut buf } => {
            let r = export.write(req.offset, &mut buf, fua);
            return (Body::from_result(r), Some(buf));
        }
        Job::Flush => export.flush(),
        Job::Trim => export.trim(req.offset, len, fua),
        Job::WriteZeroes => {
            let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
            export.write_zeroes(req.offset, len, fua, fast)
        }
    };
    (Body::from_result(r), None)
}

/// One reply on the wire: a header (simple reply or chunk header) and maybe data.
struct Entry {
    head: Head,
    data: Option<(AlignedBuf, usize, usize)>,
    /// Payload bytes to release from the budget once written.
    cost: usize,
}

enum Head {
    Fixed([u8; 28], usize),
    Owned(Vec<u8>),
}

impl Entry {
    fn head(&self) -> &[u8] {
        match &self.head {
            Head::Fixed(b, n) => &b[..*n],
            Head::Owned(v) => v,
        }
    }

    fn data(&self) -> &[u8] {
        match &self.data {
            Some((buf, skip, len)) => &buf[*skip..*skip + *len],
            None => &[],
        }
    }

    fn len(&self) -> usize {
        self.head().len() + self.data().len()
    }
}

fn fixed<const N: usize>(b: [u8; N]) -> Head {
    let mut h = [0u8; 28];
    h[..N].copy_from_slice(&b);
    Head::Fixed(h, N)
}

fn encode_reply(req: &Request, body: Body, structured: bool) -> Entry {
    let cost = cost(req);
    let (errno, msg) = match body {
        Body::Ok => return Entry { head: fixed(codec::simple_reply(0, req.cookie)), data: None, cost },
        Body::Data { buf, skip, len } => {
            let head = if !structured {
                fixed(codec::simple_reply(0, req.cookie))
            } else if len == 0 {
                // OFFSET_DATA must carry at least one byte: a zero-length read is just DONE.
                fixed(codec::done_chunk(req.cookie))
            } else {
                // One chunk with DONE set: the data is all read before the reply starts, so
                // no error can follow, and NBD_CMD_FLAG_DF is honoured whatever the length.
                // `len` fits in u32: it is at most MAX_REQUEST.
                fixed(codec::offset_data_header(req.cookie, req.offset, len as u32, true))
            };
            return Entry { head, data: Some((buf, skip, len)), cost };
        }
        Body::Err(e) => {
            tracing::debug!(cookie = req.cookie, offset = req.offset, error = %e, "request failed");
            (e.errno(), e.to_string())
        }
        Body::Errno(n, m) => (n, m.to_string()),
    };
    if structured {
        let mut v = Vec::with_capacity(64 + msg.len());
        codec::error_chunk(&mut v, req.cookie, errno, &msg, None, true);
        Entry { head: Head::Owned(v), data: None, cost }
    } else {
        Entry { head: fixed(codec::simple_reply(errno, req.cookie)), data: None, cost }
    }
}

/// Replies waiting to be written, in order; `written` bytes of the first are already out.
#[derive(Default)]
struct Outbox {
    entries: VecDeque<Entry>,
    written: usize,
    /// Bytes queued and not yet written.
    queued: usize,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes queued replies until none is left, up to [`MAX_BATCH`] per vectored write.
    /// Each written reply gives its buffer back to `pool` and its share of `budget`.
    /// Cancel-safe: progress is recorded as it is made.
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        pool: &mut BufPool,
        budget: &mut Budget,
    ) -> Poll<io::Result<()>> {
        while !self.entries.is_empty() {
            let n = {
                let mut iov = [IoSlice::new(&[]); 2 * MAX_BATCH];
                let mut count = 0;
                let mut skip = self.written;
                for e in self.entries.iter().take(MAX_BATCH) {
                    for part in [e.head(), e.data()] {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        iov[count] = IoSlice::new(&part[skip..]);
                        skip = 0;
                        count += 1;
                    }
                }
                ready!(Pin::new(&mut *w).poll_write_vectored(cx, &iov[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n, pool, budget);
        }
        Pin::new(w).poll_flush(cx)
    }

    fn advance(&mut self, n: usize, pool: &mut BufPool, budget: &mut Budget) {
        self.written += n;
        self.queued = self.queued.saturating_sub(n);
        while let Some(front) = self.entries.front() {
            let len = front.len();
            if self.written < len {
                break;
            }
            self.written -= len;
            if let Some(e) = self.entries.pop_front() {
                budget.release(e.cost);
                if let Some((buf, _, _)) = e.data {
                    pool.put(buf);
                }
            }
        }
    }

    /// Drops every queued reply (the client is gone), releasing what they hold.
    fn discard(&mut self, pool: &mut BufPool, budget: &mut Budget) {
        for e in self.entries.drain(..) {
            budget.release(e.cost);
            if let Some((buf, _, _)) = e.data {
                pool.put(buf);
            }
        }
        self.written = 0;
        self.queued = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::backend::{Backend, MemBackend};
    use crate::crypto::{SectorCipher, VolumeKey};
    use crate::export::{ExportOptions, Geometry};
    use crate::units::SectorSize;

    const SIZE: u64 = 4 << 20;

    /// A backend that never claims data is cached nor writes are cheap: every request takes
    /// the blocking-pool path.
    #[derive(Debug)]
    struct Uncached(MemBackend);

    impl Backend for Uncached {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
        fn describe(&self) -> String {
            "uncached memory".into()
        }
    }

    fn export(cached: bool, ss: SectorSize) -> Arc<Export> {
        let mem = MemBackend::new(SIZE as usize);
        let backend: Arc<dyn Backend> = if cached { Arc::new(mem) } else { Arc::new(Uncached(mem)) };
        let cipher = SectorCipher::new(&VolumeKey::generate().unwrap(), ss).unwrap();
        let opts =
            ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: false };
        let geo = Geometry { sector_size: ss, data_offset: 0, data_size: SIZE };
        Arc::new(Export::new(opts, geo, backend, cipher))
    }

    struct Server {
        client: DuplexStream,
        task: JoinHandle<Result<(), TransmissionError>>,
        stop: watch::Sender<bool>,
    }

    fn start(export: Arc<Export>, structured: bool, limits: Limits, pipe: usize) -> Server {
        let (client, server) = tokio::io::duplex(pipe);
        let (r, w) = tokio::io::split(server);
        let (stop, rx) = watch::channel(false);
        let neg = Negotiated { export, structured_replies: structured };
        Server { client, task: tokio::spawn(serve(r, w, neg, limits, rx)), stop }
    }

    fn req(command: Command, cookie: u64, offset: u64, len: u32) -> Request {
        Request { flags: 0, command, cookie, offset, len }
    }

    async fn send(c: &mut DuplexStream, r: Request, payload: &[u8]) {
        c.write_all(&r.encode()).await.unwrap();
        c.write_all(payload).await.unwrap();
    }

    /// Reads one simple reply: (errno, cookie).
    async fn simple(c: &mut DuplexStream) -> (u32, u64) {
        let mut b = [0u8; 16];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(b[4..8].try_into().unwrap()), u64::from_be_bytes(b[8..16].try_into().unwrap()))
    }

    async fn read_data(c: &mut DuplexStream, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        c.read_exact(&mut v).await.unwrap();
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect()
    }

    async fn finish(mut s: Server) -> Result<(), TransmissionError> {
        send(&mut s.client, req(Command::Disc, 0, 0, 0), &[]).await;
        tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn write_then_read_returns_the_data_inline_and_via_the_pool() {
        for cached in [true, false] {
            let mut s = start(export(cached, SectorSize::S4096), false, Limits::default(), 1 << 20);
            let data = pattern(8192, 3);
            send(&mut s.client, req(Command::Write, 1, 4096, 8192), &data).await;
            assert_eq!(simple(&mut s.client).await, (0, 1));
            send(&mut s.client, req(Command::Read, 2, 4096, 8192), &[]).await;
            assert_eq!(simple(&mut s.client).await, (0, 2));
            assert_eq!(read_data(&mut s.client, 8192).await, data, "cached {cached}");
            finish(s).await.unwrap();
        }
    }

    #[tokio::test]
    async fn pipelined_requests_all_get_their_replies() {
        for cached in [true, false] {
            let mut s = start(export(cached, SectorSize::S512), false, Limits::default(), 1 << 20);
            for i in 0..64u64 {
                send(&mut s.client, req(Command::Write, i, i * 4096, 4096), &pattern(4096, i as u8)).await;
            }
            let mut cookies: Vec<u64> = Vec::new();
            for _ in 0..64 {
                let (errno, cookie) = simple(&mut s.client).await;
                assert_eq!(errno, 0);
                cookies.push(cookie);
            }
            cookies.sort_unstable();
            assert_eq!(cookies, (0..64).collect::<Vec<_>>());
            for i in 0..64u64 {
                send(&mut s.client, req(Command::Read, 100 + i, i * 4096, 4096), &[]).await;
            }
            for _ in 0..64 {
                let (errno, cookie) = simple(&mut s.client).await;
                assert_eq!(errno, 0);
                let got = read_data(&mut s.client, 4096).await;
                assert_eq!(got, pattern(4096, (cookie - 100) as u8), "cookie {cookie} cached {cached}");
            }
            finish(s).await.unwrap();
        }
    }

    #[tokio::test]
    async fn unaligned_write_and_read_keep_the_neighbours() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        send(&mut s.client, req(Command::Write, 1, 0, 16384), &pattern(16384, 1)).await;
        assert_eq!(simple(&mut s.client).await, (0, 1));
        send(&mut s.client, req(Command::Write, 2, 1000, 5000), &[0xEE; 5000]).await;
        assert_eq!(simple(&mut s.client).await, (0, 2));
        send(&mut s.client, req(Command::Read, 3, 999, 5002), &[]).await;
        assert_eq!(simple(&mut s.client).await, (0, 3));
        let mut want = pattern(16384, 1);
        want[1000..6000].fill(0xEE);
        assert_eq!(read_data(&mut s.client, 5002).await, want[999..6001]);
        finish(s).await.unwrap();
    }

    #[tokio::test]
    async fn large_write_payload_arriving_in_pieces_lands_whole() {
        // A 64 KiB pipe: the 2 MiB payload arrives in many reads.
        for cached in [true, false] {
            let mut s = start(export(cached, SectorSize::S4096), false, Limits::default(), 64 << 10);
            let data = pattern(2 << 20, 9);
            send(&mut s.client, req(Command::Write, 1, 1 << 20, 2 << 20), &data).await;
            assert_eq!(simple(&mut s.client).await, (0, 1));
            send(&mut s.client, req(Command::Read, 2, 1 << 20, 2 << 20), &[]).await;
            assert_eq!(simple(&mut s.client).await, (0, 2));
            assert!(read_data(&mut s.client, 2 << 20).await == data, "cached {cached}");
            finish(s).await.unwrap();
        }
    }

    #[tokio::test]
    async fn client_that_does_not_read_replies_meets_back_pressure() {
        let limits = Limits { max_requests: 4, max_bytes: 64 << 20 };
        let mut s = start(export(true, SectorSize::S4096), false, limits, 16 << 10);
        // 4 KiB replies into a 16 KiB pipe: the server soon cannot write, stops reading, and
        // this client's requests back up.
        let mut sent = 0;
        let blocked = tokio::time::timeout(Duration::from_millis(500), async {
            for i in 0..10_000u64 {
                send(&mut s.client, req(Command::Read, i, 0, 4096), &[]).await;
                sent += 1;
            }
        })
        .await
        .is_err();
        assert!(blocked, "the server kept reading while its replies piled up");
        assert!(sent < 10_000);
        // Reading the replies lets everything through.
        let drain = async {
            for _ in 0..sent {
                assert_eq!(simple(&mut s.client).await.0, 0);
                read_data(&mut s.client, 4096).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), drain).await.unwrap();
        s.stop.send(true).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn flush_and_fua_go_through_the_pool() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        let mut w = req(Command::Write, 1, 0, 4096);
        w.flags = proto::CMD_FLAG_FUA;
        send(&mut s.client, w, &pattern(4096, 1)).await;
        send(&mut s.client, req(Command::Flush, 2, 0, 0), &[]).await;
        let mut got = [simple(&mut s.client).await, simple(&mut s.client).await];
        got.sort_unstable();
        assert_eq!(got, [(0, 1), (0, 2)]);
        finish(s).await.unwrap();
    }

    #[tokio::test]
    async fn bad_flags_get_einval_and_the_stream_stays_in_step() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        let mut w = req(Command::Write, 1, 0, 4096);
        w.flags = proto::CMD_FLAG_DF;
        send(&mut s.client, w, &pattern(4096, 1)).await;
        assert_eq!(simple(&mut s.client).await, (proto::EINVAL, 1));
        send(&mut s.client, req(Command::Read, 2, 0, 512), &[]).await;
        assert_eq!(simple(&mut s.client).await, (0, 2));
        read_data(&mut s.client, 512).await;
        finish(s).await.unwrap();
    }

    #[tokio::test]
    async fn out_of_range_requests_get_their_errnos() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        send(&mut s.client, req(Command::Read, 1, SIZE, 4096), &[]).await;
        assert_eq!(simple(&mut s.client).await, (proto::EINVAL, 1));
        send(&mut s.client, req(Command::Write, 2, SIZE - 512, 4096), &[0; 4096]).await;
        assert_eq!(simple(&mut s.client).await, (proto::ENOSPC, 2));
        finish(s).await.unwrap();
    }

    #[tokio::test]
    async fn structured_read_is_one_offset_data_chunk() {
        let mut s = start(export(true, SectorSize::S4096), true, Limits::default(), 1 << 20);
        send(&mut s.client, req(Command::Write, 1, 8192, 4096), &pattern(4096, 5)).await;
        assert_eq!(simple(&mut s.client).await, (0, 1));
        send(&mut s.client, req(Command::Read, 2, 8192, 4096), &[]).await;
        let mut h = [0u8; 28];
        s.client.read_exact(&mut h).await.unwrap();
        assert_eq!(h, codec::offset_data_header(2, 8192, 4096, true));
        assert_eq!(read_data(&mut s.client, 4096).await, pattern(4096, 5));
        finish(s).await.unwrap();
    }

    #[tokio::test]
    async fn eof_inside_a_write_payload_is_an_error() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        s.client.write_all(&req(Command::Write, 1, 0, 1 << 20).encode()).await.unwrap();
        s.client.write_all(&[0u8; 1000]).await.unwrap();
        drop(s.client);
        let r = tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap();
        assert!(matches!(r, Err(TransmissionError::Io(ref e)) if e.kind() == io::ErrorKind::UnexpectedEof), "{r:?}");
    }

    #[tokio::test]
    async fn bad_magic_is_a_protocol_violation() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        s.client.write_all(&[0xFFu8; REQUEST_LEN]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap();
        assert!(matches!(r, Err(TransmissionError::Protocol(_))), "{r:?}");
    }

    #[tokio::test]
    async fn oversized_write_payload_ends_the_connection() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        s.client.write_all(&req(Command::Write, 1, 0, MAX_REQUEST + 1).encode()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap();
        assert!(matches!(r, Err(TransmissionError::PayloadTooLarge { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn shutdown_finishes_the_requests_in_flight() {
        let mut s = start(export(false, SectorSize::S4096), false, Limits::default(), 1 << 20);
        for i in 0..8u64 {
            send(&mut s.client, req(Command::Write, i, i * 65536, 65536), &pattern(65536, i as u8)).await;
        }
        // Every write was read (its reply proves it), then shutdown: the rest drain.
        assert_eq!(simple(&mut s.client).await.0, 0);
        s.stop.send(true).unwrap();
        for _ in 1..8 {
            assert_eq!(simple(&mut s.client).await.0, 0);
        }
        tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap().unwrap();
    }
}
