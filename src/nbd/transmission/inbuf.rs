//! The connection's input buffer: what one `read` of the socket brought and the requests have
//! not consumed yet. Request headers, and write payloads up to [`GATHER_MAX`], are served from
//! it in place; larger payloads continue into a buffer of their own.

use super::GATHER_MAX;
use crate::nbd::codec::EXTENDED_REQUEST_LEN;

/// `buf[start..end]` holds received bytes not yet consumed.
pub(super) struct InBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InBuf {
    /// `size` must hold a header and a gathered payload with room to spare, so that
    /// [`InBuf::spare`] is never empty after [`InBuf::compact`].
    pub(super) fn new(size: usize) -> InBuf {
        assert!(size > EXTENDED_REQUEST_LEN + GATHER_MAX, "input buffer too small for a gathered request");
        InBuf { buf: vec![0u8; size].into_boxed_slice(), start: 0, end: 0 }
    }

    /// The bytes received and not consumed.
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The same, to encrypt a gathered write payload in place.
    pub(super) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// The first `n` bytes of [`InBuf::data`] are used up. Once all are, the buffer starts
    /// over at the front.
    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves unconsumed bytes to the front when the free tail is too short for a gathered
    /// request (header plus up to [`GATHER_MAX`] payload). The connection reads only while
    /// less than one request is buffered, so afterwards the tail is never empty (a read into
    /// an empty slice would look like the end of the stream).
    pub(super) fn compact(&mut self) {
        if self.start > 0 && self.buf.len() - self.start < EXTENDED_REQUEST_LEN + GATHER_MAX {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The free tail, for the next read.
    pub(super) fn spare(&mut self) -> &mut [u8] {
        debug_assert!(self.end < self.buf.len(), "read into a full input buffer");
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`InBuf::spare`].
    pub(super) fn filled(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.end, "more bytes than the spare tail holds");
        self.end = (self.end + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 256 << 10;

    fn fill(b: &mut InBuf, bytes: &[u8]) {
        b.spare()[..bytes.len()].copy_from_slice(bytes);
        b.filled(bytes.len());
    }

    #[test]
    fn consuming_everything_starts_over_at_the_front() {
        let mut b = InBuf::new(SIZE);
        fill(&mut b, &[1, 2, 3, 4]);
        b.consume(3);
        assert_eq!(b.data(), &[4]);
        assert_eq!(b.spare().len(), SIZE - 4);
        b.consume(1);
        assert!(b.data().is_empty());
        assert_eq!(b.spare().len(), SIZE);
    }

    #[test]
    fn compact_moves_the_rest_only_when_a_gathered_request_would_not_fit() {
        // (bytes consumed before the rest, free tail expected after compact): with 192 KiB
        // behind the rest a header and 128 KiB fit and nothing moves; with 56 KiB it moves.
        for (consumed, spare) in [(64 << 10, SIZE - (64 << 10) - 3), (200 << 10, SIZE - 3)] {
            let mut b = InBuf::new(SIZE);
            fill(&mut b, &vec![7u8; consumed]);
            fill(&mut b, &[1, 2, 3]);
            b.consume(consumed);
            b.compact();
            assert_eq!(b.data(), &[1, 2, 3]);
            assert_eq!(b.spare().len(), spare, "after consuming {consumed}");
        }
    }

    #[test]
    fn a_gathered_payload_is_changed_in_place() {
        let mut b = InBuf::new(SIZE);
        fill(&mut b, &[0, 0, 5, 6]);
        b.consume(2);
        b.data_mut().iter_mut().for_each(|x| *x ^= 0xff);
        assert_eq!(b.data(), &[!5u8, !6u8]);
    }

    #[test]
    #[should_panic(expected = "too small")]
    fn a_buffer_that_cannot_hold_a_gathered_request_is_refused() {
        InBuf::new(GATHER_MAX);
    }
}
