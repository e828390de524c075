//! Replies: what a finished request becomes on the wire, in the form negotiated, and the
//! queue that writes them, many per vectored write, giving each reply's buffer and budget back
//! once it is out.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

use super::{Budget, Format, InFlight};
use crate::buf::{AlignedBuf, BufPool};
use crate::export::ExportError;
use crate::nbd::codec;

/// Replies written by one vectored write, at most (two slices each): a queue depth of 32
/// small replies in one system call.
const MAX_BATCH: usize = 32;

/// What a request's reply carries.
pub(super) enum Body {
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
    pub(super) fn from_result(r: Result<(), ExportError>) -> Body {
        match r {
            Ok(()) => Body::Ok,
            Err(e) => Body::Err(e),
        }
    }
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

/// One reply on the wire: a header (simple reply or chunk header) and maybe data.
struct Entry {
    head: Head,
    data: Option<(AlignedBuf, usize, usize)>,
    /// Payload bytes to release from the budget once written.
    cost: usize,
}

enum Head {
    Fixed([u8; 40], usize),
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

    /// The reply is written (or dropped): its share of the budget and its buffer go back.
    fn release(self, pool: &mut BufPool, budget: &mut Budget) {
        budget.release(self.cost);
        if let Some((buf, _, _)) = self.data {
            pool.put(buf);
        }
    }
}

fn fixed<const N: usize>(b: [u8; N]) -> Head {
    let mut h = [0u8; 40];
    h[..N].copy_from_slice(&b);
    Head::Fixed(h, N)
}

fn encode_reply(req: &InFlight, body: Body, format: Format) -> Entry {
    let cost = req.cost;
    let (cookie, offset) = (req.req.cookie, req.req.offset);
    let (errno, msg, at) = match body {
        Body::Ok => {
            let head = match format {
                Format::Extended => fixed(codec::extended_done_chunk(cookie, offset)),
                Format::Simple | Format::Structured => fixed(codec::simple_reply(0, cookie)),
            };
            return Entry { head, data: None, cost };
        }
        Body::Data { buf, skip, len } => {
            // One chunk, DONE set: the data is all read before the reply starts, so no error
            // can follow, and NBD_CMD_FLAG_DF is honoured whatever the length. At most
            // MAX_REQUEST bytes, so the length fits the chunk's 32 bits.
            let head = match format {
                Format::Simple => fixed(codec::simple_reply(0, cookie)),
                // OFFSET_DATA must carry at least one byte: a zero-length read is just DONE.
                Format::Structured if len == 0 => fixed(codec::done_chunk(cookie)),
                Format::Extended if len == 0 => fixed(codec::extended_done_chunk(cookie, offset)),
                Format::Structured => fixed(codec::offset_data_header(cookie, offset, len as u32, true)),
                Format::Extended => fixed(codec::extended_offset_data_header(cookie, offset, len as u32, true)),
            };
            return Entry { head, data: Some((buf, skip, len)), cost };
        }
        Body::Err(e) => {
            // The failed I/O covered the whole range and nothing was sent for it: the first
            // byte is where the client can no longer assume success.
            let at = (is_data_error(&e) && req.req.len > 0).then_some(offset);
            (e.errno(), e.to_string(), at)
        }
        Body::Errno(n, m) => (n, m.to_string(), None),
    };
    let head = match format {
        Format::Extended => {
            let mut v = Vec::with_capacity(64 + msg.len());
            codec::extended_error_chunk(&mut v, cookie, offset, errno, &msg, at, true);
            Head::Owned(v)
        }
        Format::Structured => {
            let mut v = Vec::with_capacity(64 + msg.len());
            codec::error_chunk(&mut v, cookie, errno, &msg, at, true);
            Head::Owned(v)
        }
        Format::Simple => fixed(codec::simple_reply(errno, cookie)),
    };
    Entry { head, data: None, cost }
}

/// Replies waiting to be written, in order; `written` bytes of the first are already out.
#[derive(Default)]
pub(super) struct Outbox {
    entries: VecDeque<Entry>,
    written: usize,
    /// Bytes queued and not yet written.
    queued: usize,
}

impl Outbox {
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes queued and not yet written.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    /// Queues the reply to `req`, framed as `format` says.
    pub(super) fn push(&mut self, req: &InFlight, body: Body, format: Format) {
        let entry = encode_reply(req, body, format);
        self.queued += entry.len();
        self.entries.push_back(entry);
    }

    /// Writes queued replies until none is left, up to [`MAX_BATCH`] per vectored write.
    /// Each written reply gives its buffer back to `pool` and its share of `budget`.
    /// Cancel-safe: progress is recorded as it is made.
    pub(super) fn poll_write<W: AsyncWrite + Unpin>(
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
                e.release(pool, budget);
            }
        }
    }

    /// Drops every queued reply (the client is gone), releasing what they hold.
    pub(super) fn discard(&mut self, pool: &mut BufPool, budget: &mut Budget) {
        for e in self.entries.drain(..) {
            e.release(pool, budget);
        }
        self.written = 0;
        self.queued = 0;
    }
}
