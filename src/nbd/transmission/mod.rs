//! The transmission phase of one connection.
//!
//! One task per connection reads requests, serves those that need not wait for a device on
//! the spot, and writes the replies. Requests arrive in batches (one `read` into a 256 KiB
//! input buffer usually brings many headers, or a header with its payload; a payload over
//! 128 KiB is read into a buffer of its own, and the header after it alone); a read that hits
//! the page cache (by `mincore` on the volume's mapping, else `preadv2(RWF_NOWAIT)`) is
//! decrypted into a pooled buffer, a page-aligned write is encrypted in place in the input
//! buffer and copied into the page cache, and the replies of the whole batch leave in one
//! vectored `write`. So a cached request costs its `mincore` (or pread) or pwrite and a share
//! of one read and one write: no thread hop, no channel, no allocation.
//!
//! Whatever may wait goes to tokio's blocking pool: reads that miss the cache, all I/O in
//! `O_DIRECT` mode, FLUSH and FUA, TRIM, WRITE_ZEROES, writes that need read-modify-write or
//! whose range another write holds, reads larger than [`INLINE_MAX`] and writes larger than
//! [`WRITE_INLINE_MAX`] (over a Unix socket, than [`INLINE_MAX`]: see [`Transport`]), and
//! anything while the export is suspended. Their replies come back through a channel and join
//! the queue; replies may leave out of order, as the spec allows.
//!
//! Two bounds keep a client from making the server buffer without limit: requests in flight
//! (read from the socket, reply not yet written) and their payload bytes. At either bound the
//! connection stops reading until replies drain, so a client that does not read its replies
//! stops being read from. Buffers come from a per-connection pool and return to it once their
//! reply is written; a connection that starts no request for 5 s frees them.
//!
//! Two error tiers: a request that fails gets an errno in its reply and the connection goes
//! on; a protocol violation (bad magic, a write payload larger than advertised) ends the
//! connection, after the requests in flight are finished. Unknown commands and flags are the
//! first tier: `EINVAL`, after the payload of a WRITE has been read (so the stream stays in
//! step).
//!
//! Replies take one of three forms, fixed by negotiation: simple; structured (chunks for reads
//! and errors); extended (`EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths, and every
//! reply a 32-byte-header chunk echoing the request's offset).
//!
//! Shutdown (`doc/proto.md`, "Terminating the transmission phase"): once the flag turns, the
//! requests in flight finish normally; requests that arrive during a grace period get
//! `NBD_ESHUTDOWN` (a WRITE's payload is read and dropped), which tells the client to
//! disconnect; then the connection closes.

use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::codec::{self, CodecError, Command, ExtendedRequest, EXTENDED_REQUEST_LEN, REQUEST_LEN};
use super::handshake::Negotiated;
use super::proto;
use crate::buf::{self, AlignedBuf, BufPool};
use crate::export::{Export, ExportError, ReadPlan, MAX_REQUEST};
use crate::metrics::Op;

mod inbuf;
mod poll;
mod reply;

use inbuf::InBuf;
use poll::BusyPoll;
use reply::{Body, Outbox};

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
    /// After shutdown starts, how long new requests are still read (and answered
    /// `NBD_ESHUTDOWN`) before the connection is closed.
    pub shutdown_grace: Duration,
    /// How long the connection's thread keeps polling for the next request once nothing is
    /// in flight, before it sleeps (zero: never). A request that finds the thread asleep pays
    /// for waking it: on a small VM an idle vCPU takes tens of µs to wake, twice per request at
    /// queue depth 1 (the client's side too). Polling costs that much CPU instead. 50 µs covers
    /// fio's turnaround on this project's VM (20 µs caught none of it). Adaptive (see `poll`):
    /// a window that ends without a request makes the connection skip the next 1, 2, 4, … up
    /// to 256 windows, so a client slower than the window costs little: through nbdfuse +
    /// loop, whose turnaround never fit, QD1 ran as fast as without polling (a fixed window
    /// made it 0.66× as fast).
    pub busy_poll: Duration,
}

impl Default for Limits {
    /// 12 MiB: twelve 1 MiB or forty-eight 256 KiB requests in flight per connection (more
    /// than fio's QD8 or nbdcopy's default needs), and four connections stay under 64 MiB.
    fn default() -> Self {
        Limits {
            max_requests: 128,
            max_bytes: 12 << 20,
            shutdown_grace: Duration::from_secs(2),
            busy_poll: Duration::from_micros(50),
        }
    }
}

/// Reads up to this many bytes are served inline when they can be (see the module doc).
/// Larger ones go to the blocking pool even when cached: their decryption takes 100 µs and
/// more per MiB, long enough that running it on another core while the connection's thread
/// moves the previous reply through the socket beats the thread hop (about 20 µs of CPU on a
/// small VM). On the connection threads, serving them inline made 1 MiB reads at QD8 over TCP
/// 0.74× as fast (`benches/ab.sh`, 3 rounds). nbdcopy's 256 KiB requests stay inline.
pub const INLINE_MAX: usize = 256 << 10;

/// Over TCP, writes up to this many bytes are served inline when they can be. Unlike a
/// read's, a write's payload has just come through the socket on this thread: encrypting it
/// and copying it into the page cache here finds it in this core's cache, where another core
/// would first have to fetch it (the AES pass took 114 µs per MiB there; the cipher
/// benchmark's in-cache pass takes 38–70). Side by side with the build that sent writes over
/// 256 KiB to the pool (`benches/ab.sh`, fio 1 MiB at QD8): 1.20× over TCP. The bound keeps
/// one request from holding the thread, and the other connections on it, for more than about
/// a millisecond.
pub const WRITE_INLINE_MAX: usize = 4 << 20;

/// What carries the connection. It decides how large a write is served inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP, TLS or not: autotuned socket buffers of several MiB keep the next payloads
    /// coming while this thread writes one inline, up to [`WRITE_INLINE_MAX`].
    Tcp,
    /// A Unix socket holds no more than the client's send buffer (about 208 KiB by default):
    /// while this thread encrypted a 1 MiB write inline the client stalled (with 512-byte
    /// sectors the pool made 1 MiB writes 1.53× as fast: `benches/ab.sh`, 4 rounds). So writes
    /// over [`INLINE_MAX`] go to the pool, and this thread keeps draining the socket meanwhile.
    Unix,
}

impl Transport {
    fn write_inline_max(self) -> usize {
        match self {
            Transport::Tcp => WRITE_INLINE_MAX,
            Transport::Unix => INLINE_MAX,
        }
    }
}

/// Once this many reply bytes are queued, the connection writes them before serving more
/// requests: large replies leave one by one, so the client consumes one while the next is
/// read and decrypted; small ones still leave in batches.
const FLUSH_AT: usize = 256 << 10;

/// Size of the input buffer.
const INBUF: usize = 256 << 10;

/// Write payloads up to this size are gathered in the input buffer (and encrypted there);
/// larger ones are read straight into a pooled buffer of their own.
const GATHER_MAX: usize = 128 << 10;

/// A connection that starts no request for this long frees its pool's idle buffers. Without
/// it, each connection kept up to `max_bytes` of buffers for as long as it stayed open: 8
/// connections idle after a burst of 1 MiB requests held 72–95 MiB. Mapping 12 MiB again and
/// faulting it in costs about 4 ms of CPU, so a client that writes every few seconds (a file
/// system committing its journal) pays under 0.1% of a core.
const IDLE_RELEASE: Duration = Duration::from_secs(5);

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

/// Serves requests until the client disconnects or sends DISC, or shutdown's grace period
/// ends; then finishes every request in flight and writes its reply.
pub async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    neg: Negotiated,
    limits: Limits,
    transport: Transport,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let format = Format::of(&neg);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut conn = Conn {
        export: neg.export,
        format,
        budget: Budget { requests: 0, bytes: 0, limits },
        pool: BufPool::new(limits.max_bytes),
        out: Outbox::default(),
        jobs: 0,
        done_tx,
        write_inline_max: transport.write_inline_max(),
        shutting: false,
        discard: 0,
        last_start: Instant::now(),
        poll: BusyPoll::new(limits.busy_poll),
    };
    let mut inbuf = InBuf::new(INBUF);
    let mut pending: Option<Pending> = None;
    // A payload read into its own buffer just ended: the next read takes only a header (see
    // `read_some`).
    let mut header_next = false;
    // One future for the whole connection: re-creating it per loop turn would register and
    // drop a waiter on the watch channel every time (a few percent of a busy connection's CPU).
    let stop = shutdown.wait_for(|s| *s);
    tokio::pin!(stop);
    // The end of the shutdown grace period, armed when shutdown starts.
    let grace = tokio::time::sleep(Duration::from_secs(365 * 86400));
    tokio::pin!(grace);
    // When the pool's idle buffers go, unless a request starts before then. Moved on only when
    // it fires, so a connection touches the timer at most once per `IDLE_RELEASE`.
    let idle = tokio::time::sleep(IDLE_RELEASE);
    tokio::pin!(idle);
    // Reading stops for good on DISC, the end of the grace period, end of stream or an error.
    let mut reading = true;
    let mut result: Result<(), TransmissionError> = Ok(());
    // After a failed write the client is gone: replies are dropped, not written.
    let mut write_failed = false;
    // The last write attempt found the socket full: serve requests meanwhile, up to the budget.
    let mut socket_full = false;

    loop {
        // Requests already received that could start once the queued replies are out.
        let mut more = false;
        // A received request waits for budget.
        let mut blocked = false;
        if reading && pending.is_none() {
            let flush_at = if socket_full { usize::MAX } else { FLUSH_AT };
            match conn.take_requests(&mut inbuf, &mut pending, flush_at) {
                Ok(Step::Continue) => {}
                Ok(Step::Blocked) => blocked = true,
                Ok(Step::Yield) => more = true,
                Ok(Step::Disc) => reading = false,
                Err(e) => {
                    result = Err(e);
                    reading = false;
                }
            }
        }
        let in_flight = conn.budget.requests;
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
        // The replies just written released budget that a received request waits for: start
        // it now. (Waiting below would hang when the client has nothing more to send.)
        if more || (blocked && conn.budget.requests < in_flight) {
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
        let shutting = conn.shutting;
        // Only a quiet connection polls the timer: a stream of requests never touches it.
        let quiet = conn.budget.requests == 0 && conn.pool.idle_bytes() > 0;
        // Busy poll: yield to the runtime, which checks the sockets without sleeping, instead of
        // waiting (see `poll`).
        let polling = can_read && conn.budget.requests == 0 && conn.poll.poll_now(conn.export.metrics());
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
            _ = &mut stop, if reading && !shutting => {
                conn.shutting = true;
                grace.as_mut().reset(tokio::time::Instant::now() + limits.shutdown_grace);
            }
            () = &mut grace, if reading && shutting => {
                reading = false;
                pending = None;
            }
            r = read_some(&mut reader, &mut inbuf, &mut pending, header_next.then_some(format.header_len())), if can_read => match r {
                Ok(0) => {
                    reading = false;
                    // EOF between requests is the normal end; inside a header or a payload
                    // the stream is broken.
                    if pending.is_some() || conn.discard > 0 || inbuf.data().len() >= format.header_len() {
                        result = Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    } else if !inbuf.data().is_empty() {
                        result = Err(TransmissionError::TruncatedHeader);
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
                            header_next = true;
                        }
                    } else {
                        inbuf.filled(n);
                        header_next = false;
                    }
                }
                Err(e) => {
                    reading = false;
                    pending = None;
                    result = Err(e.into());
                }
            },
            () = &mut idle, if quiet => {
                let due = conn.last_start + IDLE_RELEASE;
                if Instant::now() >= due {
                    let bytes = conn.pool.release_idle();
                    tracing::debug!(bytes, "idle connection: buffers released");
                } else {
                    idle.as_mut().reset(due.into());
                }
            }
            () = tokio::task::yield_now(), if polling => {}
            else => break,
        }
    }
    if conn.poll.enabled() {
        let p = &conn.poll;
        tracing::debug!(hits = p.hits, misses = p.misses, skipped = p.skipped, "busy poll");
    }
    result
}

/// Reads what the socket has into the pending payload, or else into the input buffer, at
/// most `limit` bytes there. The caller limits the read after a large payload to one header:
/// in a stream of large writes the next request is most likely another, and a full read
/// would bring the start of its payload into the input buffer, to be copied out again (2.3%
/// of the server's CPU on 1 MiB writes over TCP); one more small read costs less (side by
/// side over TCP, `benches/ab.sh`, 6 rounds: 256 KiB writes at QD16 1.06–1.08×, 1 MiB writes
/// at QD8 1.07×, at about 0.94× the server's CPU per MiB).
/// Cancel-safe: a read either happened (and is reported) or did not.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    inbuf: &mut InBuf,
    pending: &mut Option<Pending>,
    limit: Option<usize>,
) -> io::Result<usize> {
    match pending {
        Some(p) => reader.read(&mut p.buf[p.filled..]).await,
        None => {
            inbuf.compact();
            let spare = inbuf.spare();
            let n = limit.map_or(spare.len(), |l| l.min(spare.len()));
            reader.read(&mut spare[..n]).await
        }
    }
}

/// A request being served: the decoded header, the payload bytes it holds against the
/// budget, and whether it counts in the export's metrics (refused requests do not).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    req: ExtendedRequest,
    cost: usize,
    started: Instant,
    metered: bool,
}

/// A WRITE whose payload is being read straight into its own buffer.
struct Pending {
    req: InFlight,
    buf: AlignedBuf,
    filled: usize,
}

enum Step {
    /// Wait for more input.
    Continue,
    /// A received request waits for room in the budget, which only replies going out make.
    Blocked,
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
    req: InFlight,
    body: Body,
    spare: Option<AlignedBuf>,
}

/// A write payload: still in the input buffer, or in a buffer of its own.
enum WriteData<'a> {
    InBuf(&'a mut [u8]),
    Owned(AlignedBuf),
}

fn data_len(d: &WriteData<'_>) -> usize {
    match d {
        WriteData::InBuf(b) => b.len(),
        WriteData::Owned(b) => b.len(),
    }
}

struct Conn {
    export: Arc<Export>,
    format: Format,
    budget: Budget,
    pool: BufPool,
    out: Outbox,
    /// Requests on the blocking pool.
    jobs: usize,
    /// Larger writes go to the blocking pool even when they could be served inline.
    write_inline_max: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Shutdown started: new requests get `NBD_ESHUTDOWN`.
    shutting: bool,
    /// Payload bytes still to read and drop (of a request answered without its payload).
    discard: u64,
    /// When the last request started (see [`IDLE_RELEASE`]).
    last_start: Instant,
    poll: BusyPoll,
}

impl Conn {
    /// Starts every complete request in the input buffer that the budget admits. Stops with
    /// [`Step::Yield`] when `flush_at` reply bytes are queued and the next request could start
    /// right away (so the caller's "more to do" never spins without progress).
    fn take_requests(
        &mut self,
        inbuf: &mut InBuf,
        pending: &mut Option<Pending>,
        flush_at: usize,
    ) -> Result<Step, TransmissionError> {
        let hl = self.format.header_len();
        loop {
            if self.discard > 0 {
                let n = inbuf.data().len().min(usize::try_from(self.discard).unwrap_or(usize::MAX));
                inbuf.consume(n);
                self.discard -= n as u64;
                if self.discard > 0 {
                    return Ok(Step::Continue);
                }
            }
            let Some(raw) = inbuf.data().get(..hl) else { return Ok(Step::Continue) };
            let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
            hdr[..hl].copy_from_slice(raw);
            let req = self.format.decode(&hdr)?;
            if req.command == Command::Disc {
                inbuf.consume(hl);
                return Ok(Step::Disc);
            }
            let payload = self.format.payload_len(&req);
            if let Some(len) = payload.filter(|&l| l > u64::from(MAX_REQUEST)) {
                // The payload cannot be skipped without reading it all; the spec allows a hard
                // disconnect for a payload over the advertised maximum.
                return Err(TransmissionError::PayloadTooLarge { len, max: MAX_REQUEST });
            }
            // Both at most MAX_REQUEST: checked above; longer reads are refused unbuffered.
            // The cost is the capacity of the buffer the request may hold.
            let len = payload.unwrap_or(0) as usize;
            let cost = match (payload, req.command) {
                (Some(_), _) => buf::capacity_for(len),
                (None, Command::Read) if req.len <= u64::from(MAX_REQUEST) => buf::capacity_for(req.len as usize),
                (None, _) => 0,
            };
            let cost = if self.shutting { 0 } else { cost };
            if !self.budget.admits(cost) {
                return Ok(Step::Blocked);
            }
            let gathered = payload.is_some() && len <= GATHER_MAX && !self.shutting;
            if gathered && inbuf.data().len() < hl + len {
                return Ok(Step::Continue);
            }
            // The request can start: first let queued replies go out if there are enough.
            if self.out.queued() >= flush_at {
                return Ok(Step::Yield);
            }
            inbuf.consume(hl);
            self.budget.take(cost);
            let req = InFlight { req, cost, started: Instant::now(), metered: false };
            self.last_start = req.started;
            self.poll.request_started(self.export.metrics());
            if self.shutting {
                // Consume the payload, answer ESHUTDOWN, keep the stream in step.
                self.discard = payload.unwrap_or(0);
                self.reply(req, Body::Errno(proto::ESHUTDOWN, "the server is shutting down"));
                continue;
            }
            if payload.is_none() {
                self.start(req);
                continue;
            }
            if gathered {
                self.run_write(req, WriteData::InBuf(&mut inbuf.data_mut()[..len]));
                inbuf.consume(len);
                continue;
            }
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

    /// Refuses `req` if it must be; otherwise counts it as started in the export's metrics.
    fn admit(&mut self, req: &mut InFlight) -> Option<Body> {
        let refusal = refuse(&req.req, self.format);
        if refusal.is_some() {
            tracing::debug!(req = ?req.req, "request refused");
        } else {
            req.metered = true;
            self.export.metrics().request_started();
        }
        refusal
    }

    /// Starts a request that has no payload.
    fn start(&mut self, mut req: InFlight) {
        if let Some(body) = self.admit(&mut req) {
            return self.reply(req, body);
        }
        let (offset, len) = (req.req.offset, req.req.len);
        match req.req.command {
            Command::Read => {
                let plan = match self.export.plan_read(offset, len) {
                    Ok(p) => p,
                    Err(e) => return self.reply(req, Body::Err(e)),
                };
                let mut buf = self.pool.get(plan.wide.len as usize);
                if self.export.cached() && plan.len <= INLINE_MAX {
                    match self.export.read_planned(&plan, &mut buf, true) {
                        Ok(true) => return self.reply(req, Body::Data { buf, skip: plan.skip, len: plan.len }),
                        Ok(false) => {}
                        Err(e) => {
                            self.pool.put(buf);
                            return self.reply(req, Body::Err(e));
                        }
                    }
                }
                self.dispatch(req, Job::Read { plan, buf });
            }
            // The data is on a local disk behind the page cache: validating the range is all
            // a prefetch hint needs.
            Command::Cache => {
                let body = Body::from_result(self.export.validate_read(offset, len));
                self.reply(req, body);
            }
            Command::Flush => self.dispatch(req, Job::Flush),
            Command::Trim => self.dispatch(req, Job::Trim),
            Command::WriteZeroes => self.dispatch(req, Job::WriteZeroes),
            // Refused by `admit`; WRITE comes through `run_write`.
            Command::Write | Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                self.reply(req, Body::Errno(proto::EINVAL, "unsupported command"));
            }
        }
    }

    /// Starts a request whose payload has been read (a WRITE; anything else with a payload is
    /// refused).
    fn run_write(&mut self, mut req: InFlight, data: WriteData<'_>) {
        if let Some(body) = self.admit(&mut req) {
            if let WriteData::Owned(buf) = data {
                self.pool.put(buf);
            }
            return self.reply(req, body);
        }
        let fua = req.req.flags & proto::CMD_FLAG_FUA != 0;
        let offset = req.req.offset;
        let inline = self.export.cached() && data_len(&data) <= self.write_inline_max;
        let buf = match data {
            WriteData::InBuf(payload) => {
                if inline {
                    match self.export.try_write(offset, payload, fua) {
                        Ok(true) => return self.reply(req, Body::Ok),
                        Ok(false) => {}
                        Err(e) => return self.reply(req, Body::Err(e)),
                    }
                }
                let mut buf = self.pool.get(payload.len());
                buf.copy_from_slice(payload);
                buf
            }
            WriteData::Owned(mut buf) => {
                if inline {
                    match self.export.try_write(offset, &mut buf, fua) {
                        Ok(true) => {
                            self.pool.put(buf);
                            return self.reply(req, Body::Ok);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.pool.put(buf);
                            return self.reply(req, Body::Err(e));
                        }
                    }
                }
                buf
            }
        };
        self.dispatch(req, Job::Write { buf });
    }

    /// Runs a job on the blocking pool; its reply comes back through `done_tx`.
    fn dispatch(&mut self, req: InFlight, job: Job) {
        self.jobs += 1;
        let export = self.export.clone();
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let (body, spare) = run_job(&export, &req.req, job);
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
        self.reply(done.req, done.body);
    }

    /// The reply status of `req` is decided: count it in the metrics, queue the reply.
    fn reply(&mut self, req: InFlight, body: Body) {
        if req.metered {
            account(&self.export, &req, &body);
        }
        self.out.push(&req, body, self.format);
    }
}

/// The reply status is decided: count the request in the export's metrics (and raw-volume
/// failures in its error counter), and log a failure (rate-limited at warn, see `metrics`).
fn account(export: &Export, req: &InFlight, body: &Body) {
    let m = export.metrics();
    let r = &req.req;
    let op = metrics_op(r.command);
    let errno = match body {
        Body::Ok | Body::Data { .. } => 0,
        Body::Err(e) => {
            export.record_error(e);
            m.log_failure(export.name(), op, r.offset, r.len, e.fault(), e.errno(), e);
            e.errno()
        }
        Body::Errno(n, _) => *n,
    };
    m.request_done(op, r.len, errno, req.started);
}

/// How the metrics count a command.
fn metrics_op(cmd: Command) -> Op {
    match cmd {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim,
        Command::WriteZeroes => Op::WriteZeroes,
        Command::Cache => Op::Cache,
        Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => Op::Other,
    }
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

/// Does a job on a blocking thread. Returns the reply and, if the job's buffer is not part
/// of the reply, the buffer (for the pool).
fn run_job(export: &Export, req: &ExtendedRequest, job: Job) -> (Body, Option<AlignedBuf>) {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
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
        Job::Trim => export.trim(req.offset, req.len, fua),
        Job::WriteZeroes => {
            let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
            export.write_zeroes(req.offset, req.len, fua, fast)
        }
    };
    (Body::from_result(r), None)
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
    use crate::nbd::codec::Request;
    use crate::units::SectorSize;

    const SIZE: u64 = 16 << 20;

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
        let neg = Negotiated { export, structured_replies: structured, extended_headers: false };
        Server { client, task: tokio::spawn(serve(r, w, neg, limits, Transport::Tcp, rx)), stop }
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
        // Small cached requests are served inline; larger ones, and all of an uncached
        // export's, on the blocking pool (reads over INLINE_MAX, writes over WRITE_INLINE_MAX).
        let sizes = [(true, 8192), (true, INLINE_MAX + 4096), (true, WRITE_INLINE_MAX + 4096), (false, 8192)];
        for (cached, len) in sizes {
            let mut s = start(export(cached, SectorSize::S4096), false, Limits::default(), 4 << 20);
            let data = pattern(len, 3);
            send(&mut s.client, req(Command::Write, 1, 4096, len as u32), &data).await;
            assert_eq!(simple(&mut s.client).await, (0, 1));
            send(&mut s.client, req(Command::Read, 2, 4096, len as u32), &[]).await;
            assert_eq!(simple(&mut s.client).await, (0, 2));
            assert_eq!(read_data(&mut s.client, len).await, data, "cached {cached}, {len} bytes");
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
    async fn mixed_write_sizes_in_one_stream_all_land_whole() {
        // In one stream: a write just over the gathering limit (its own buffer, served
        // inline), one over WRITE_INLINE_MAX (served on the pool) and a small gathered one.
        // Each lands whole.
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        let (a, b, c) = (pattern(GATHER_MAX + 8192, 3), pattern(WRITE_INLINE_MAX + 8192, 4), pattern(8192, 5));
        let mut wire = Vec::new();
        for (cookie, offset, data) in [(1, 0, &a), (2, 1 << 20, &b), (3, 6 << 20, &c)] {
            wire.extend_from_slice(&req(Command::Write, cookie, offset, data.len() as u32).encode());
            wire.extend_from_slice(data);
        }
        s.client.write_all(&wire).await.unwrap();
        // The replies may come in any order (the largest write goes through the pool).
        let mut done: Vec<(u32, u64)> = Vec::new();
        for _ in 0..3 {
            done.push(simple(&mut s.client).await);
        }
        done.sort();
        assert_eq!(done, [(0, 1), (0, 2), (0, 3)]);
        for (cookie, offset, data) in [(4, 0, &a), (5, 1 << 20, &b), (6, 6 << 20, &c)] {
            send(&mut s.client, req(Command::Read, cookie, offset, data.len() as u32), &[]).await;
            assert_eq!(simple(&mut s.client).await, (0, cookie));
            assert!(read_data(&mut s.client, data.len()).await == *data);
        }
        finish(s).await.unwrap();
    }

    /// A reader that records how many bytes each read asked for.
    struct Asks<R> {
        inner: R,
        asks: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Asks<R> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let asked = buf.remaining();
            let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            if r.is_ready() {
                self.asks.lock().unwrap().push(asked);
            }
            r
        }
    }

    #[tokio::test]
    async fn header_after_a_large_payload_is_read_on_its_own() {
        // After a payload read into its own buffer, the next read takes one header, so the
        // next large payload goes straight into its buffer instead of through the input
        // buffer (from which it would be copied). Three 384 KiB writes and DISC, all sent at
        // once: the headers of the second, the third and DISC are read on their own.
        let (mut client, server) = tokio::io::duplex(4 << 20);
        let (r, w) = tokio::io::split(server);
        let asks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = Asks { inner: r, asks: asks.clone() };
        let (_stop, rx) = watch::channel(false);
        let export = export(true, SectorSize::S4096);
        let neg = Negotiated { export, structured_replies: false, extended_headers: false };
        let task = tokio::spawn(serve(reader, w, neg, Limits::default(), Transport::Tcp, rx));
        let len = GATHER_MAX * 3;
        let mut wire = Vec::new();
        for i in 0..3u64 {
            wire.extend_from_slice(&req(Command::Write, i, i * len as u64, len as u32).encode());
            wire.extend_from_slice(&pattern(len, i as u8));
        }
        wire.extend_from_slice(&req(Command::Disc, 9, 0, 0).encode());
        client.write_all(&wire).await.unwrap();
        for _ in 0..3 {
            assert_eq!(simple(&mut client).await.0, 0);
        }
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
        let asks = asks.lock().unwrap();
        assert_eq!(asks.iter().filter(|&&a| a == REQUEST_LEN).count(), 3, "reads asked for {asks:?}");
    }

    #[tokio::test]
    async fn client_that_does_not_read_replies_meets_back_pressure() {
        let limits = Limits { max_requests: 4, ..Limits::default() };
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
        w.flags = proto::CMD_FLAG_NO_HOLE;
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
    async fn shutdown_answers_new_requests_eshutdown_then_closes() {
        let limits = Limits { shutdown_grace: Duration::from_millis(500), ..Limits::default() };
        let mut s = start(export(true, SectorSize::S4096), false, limits, 1 << 20);
        s.stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&mut s.client, req(Command::Write, 7, 0, 512), &[1; 512]).await;
        send(&mut s.client, req(Command::Flush, 8, 0, 0), &[]).await;
        for cookie in [7u64, 8] {
            let mut reply = [0u8; 16];
            s.client.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply, codec::simple_reply(proto::ESHUTDOWN, cookie), "cookie {cookie}");
        }
        // Then, after the grace period, the server closes without the client doing anything.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.client.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
        s.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn extended_headers_take_64_bit_requests_and_give_extended_replies() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let (_stop, rx) = watch::channel(false);
        let neg =
            Negotiated { export: export(true, SectorSize::S4096), structured_replies: false, extended_headers: true };
        let task = tokio::spawn(serve(r, w, neg, Limits::default(), Transport::Tcp, rx));
        let write = ExtendedRequest { flags: 0, command: Command::Write, cookie: 1, offset: 4096, len: 4096 };
        client.write_all(&write.encode()).await.unwrap();
        client.write_all(&pattern(4096, 4)).await.unwrap();
        let mut done = [0u8; 32];
        client.read_exact(&mut done).await.unwrap();
        assert_eq!(done, codec::extended_done_chunk(1, 4096));
        let read = ExtendedRequest { flags: 0, command: Command::Read, cookie: 2, offset: 4096, len: 4096 };
        client.write_all(&read.encode()).await.unwrap();
        let mut h = [0u8; 40];
        client.read_exact(&mut h).await.unwrap();
        assert_eq!(h, codec::extended_offset_data_header(2, 4096, 4096, true));
        assert_eq!(read_data(&mut client, 4096).await, pattern(4096, 4));
        let disc = ExtendedRequest { flags: 0, command: Command::Disc, cookie: 3, offset: 0, len: 0 };
        client.write_all(&disc.encode()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn eof_inside_a_header_is_a_truncated_header() {
        let mut s = start(export(true, SectorSize::S4096), false, Limits::default(), 1 << 20);
        s.client.write_all(&req(Command::Read, 1, 0, 512).encode()[..10]).await.unwrap();
        drop(s.client);
        let r = tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap();
        assert!(matches!(r, Err(TransmissionError::TruncatedHeader)), "{r:?}");
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
