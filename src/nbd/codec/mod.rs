//! The NBD wire codec: bytes in, typed values out; typed values in, bytes out.
//!
//! Pure: no sockets, no tokio, no `std::io`. The connection layers read a fixed-size header
//! (or a payload they have already bounded) and hand the bytes here; replies are appended to a
//! `Vec<u8>` or returned as fixed arrays, so a read's data can follow its header without a copy.
//!
//! Decoding goes through [`Reader`], a cursor that fails on truncation and, once a message is
//! fully parsed, on trailing bytes (the shape of rustls's `msgs/codec.rs`). Unknown option and
//! command codes decode to an `Unknown` variant; whether a flag or code is acceptable depends on
//! what was negotiated, so that judgement belongs to the caller.
//!
//! The layouts quoted next to each function are those of NetworkBlockDevice/nbd `doc/proto.md`
//! (`C:` client to server, `S:` server to client). Every integer is big-endian.
//!
//! Two halves, one per phase: [`handshake`] (the greeting, options and their replies) and
//! [`transmission`] (requests and the three reply forms). Both are re-exported here, so a
//! caller names `codec::decode_request` whichever half holds it.

pub mod handshake;
pub mod transmission;

pub use handshake::*;
pub use transmission::*;

/// Why bytes could not be decoded.
///
/// During option haggling any of these means "reply `NBD_REP_ERR_INVALID` and carry on"; in a
/// request header only [`CodecError::BadMagic`] can occur, and it ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input ended inside a fixed-size field.
    #[error("input ends at byte {offset}: a {needed}-byte field has {available} bytes left")]
    Truncated { offset: usize, needed: usize, available: usize },
    /// A message was fully decoded but bytes were left over.
    #[error("{count} unexpected bytes after the end of the message at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },
    /// A magic number did not match.
    #[error("bad magic number {got:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, got: u64 },
    /// A length is over its limit (the spec's 4096 bytes for strings, or [`MAX_OPTION_LEN`](crate::nbd::proto::MAX_OPTION_LEN)).
    #[error("{field} is {len} bytes long, more than the limit of {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    /// A string is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    /// The message is malformed in a way the other variants do not describe, e.g. a length
    /// field that runs past the end of the option data.
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

// =============================================================================================
// Reader
// =============================================================================================

/// A cursor over a byte slice that never reads past its end.
///
/// Every read either returns the bytes asked for or [`CodecError::Truncated`]; a decoder ends
/// with [`Reader::expect_empty`] so that trailing garbage is an error rather than ignored.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
    consumed: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf, consumed: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Bytes read so far (the offset of the next read).
    pub fn position(&self) -> usize {
        self.consumed
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or_else(|| self.truncated(n))?;
        self.advance(tail, n);
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let (head, tail) = self.rest.split_first_chunk::<N>().ok_or_else(|| self.truncated(N))?;
        self.advance(tail, N);
        Ok(*head)
    }

    /// Everything left; the reader is empty afterwards.
    pub fn rest(&mut self) -> &'a [u8] {
        let all = self.rest;
        self.advance(&[], all.len());
        all
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        self.array().map(u8::from_be_bytes)
    }

    pub fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Succeeds only if every byte has been read.
    pub fn expect_empty(&self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes { offset: self.consumed, count: self.rest.len() })
        }
    }

    fn advance(&mut self, tail: &'a [u8], n: usize) {
        self.rest = tail;
        self.consumed = self.consumed.saturating_add(n);
    }

    fn truncated(&self, needed: usize) -> CodecError {
        CodecError::Truncated { offset: self.consumed, needed, available: self.rest.len() }
    }
}

// =============================================================================================
// Writing helpers
// =============================================================================================

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
///
/// Strings the server sends are clipped to the spec's 4096-byte limit rather than rejected: the
/// reply stays well-formed, and long names are refused earlier, by config validation.
fn clip_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a boundary
    }
    s.get(..end).unwrap_or_default()
}

/// `bytes`, cut to at most `u32::MAX` bytes, with that length as a `u32`; keeps a 32-bit
/// length field consistent with the data that follows it, whatever the caller passes.
fn clip_u32(bytes: &[u8]) -> (&[u8], u32) {
    let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    (bytes.get(..n as usize).unwrap_or(bytes), n)
}

/// Writes a 32-bit length and then the bytes.
fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    let (bytes, n) = clip_u32(bytes);
    put_u32(out, n);
    out.extend_from_slice(bytes);
}

/// Decodes a string that must be UTF-8 and (as the spec says of all strings) free of NUL.
fn utf8(field: &'static str, bytes: &[u8]) -> Result<String, CodecError> {
    let s = std::str::from_utf8(bytes).map_err(|_| CodecError::BadUtf8 { field })?;
    if s.contains('\0') {
        return Err(CodecError::Invalid("a string contains a NUL character"));
    }
    Ok(s.to_owned())
}

/// Reads a string of `len` bytes (a length already read from the wire) that must leave at
/// least `reserve` bytes for the fields after it. A length that runs past the data is
/// [`CodecError::Invalid`] with `overrun`; one over `max` is [`CodecError::TooLong`].
fn string_of_len(
    r: &mut Reader<'_>,
    len: u32,
    field: &'static str,
    max: usize,
    reserve: usize,
    overrun: &'static str,
) -> Result<String, CodecError> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > r.remaining().saturating_sub(reserve) {
        return Err(CodecError::Invalid(overrun));
    }
    if len > max {
        return Err(CodecError::TooLong { field, len, max });
    }
    utf8(field, r.take(len)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is a failure with a backtrace
mod tests {
    use super::*;

    // ---- Reader ---------------------------------------------------------------------------

    #[test]
    fn reader_reads_big_endian_fields_in_order() {
        let mut r = Reader::new(&[0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]);
        assert_eq!(r.u8().unwrap(), 0x01);
        assert_eq!(r.u16().unwrap(), 0x0203);
        assert_eq!(r.u32().unwrap(), 0x0405_0607);
        assert!(r.expect_empty().is_ok());
    }

    #[test]
    fn reader_past_the_end_is_truncated_and_consumes_nothing() {
        let mut r = Reader::new(&[1, 2, 3]);
        r.u8().unwrap();
        assert_eq!(r.u32(), Err(CodecError::Truncated { offset: 1, needed: 4, available: 2 }));
        assert_eq!(r.take(2).unwrap(), &[2, 3]);
    }

    #[test]
    fn reader_with_bytes_left_is_not_empty() {
        let mut r = Reader::new(&[1, 2, 3]);
        r.u8().unwrap();
        assert_eq!(r.expect_empty(), Err(CodecError::TrailingBytes { offset: 1, count: 2 }));
    }
}
