//! The transmission phase: request headers (compact and extended) and replies (simple,
//! structured chunks, extended chunks) (`doc/proto.md`, "Transmission phase").

use crate::nbd::proto::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_RESIZE, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, MAX_STRING, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

use super::{clip_str, put_u16, put_u32, put_u64, CodecError, Reader};

/// The type of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    /// Any other type; the server replies `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// The wire code (`NBD_CMD_*`).
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Resize => CMD_RESIZE,
            Command::Unknown(code) => code,
        }
    }
}

impl From<u16> for Command {
    fn from(code: u16) -> Self {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }
}

/// A decoded request header. For `Write`, `len` bytes of data follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits, raw: which are valid depends on the command and on negotiation.
    pub flags: u16,
    pub command: Command,
    /// Opaque; echoed in every reply to this request (the spec's "handle" in older versions).
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Length of a (compact) request header on the wire.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Encodes the header (the client side; used by tests and fuzzing). Layout at
    /// [`decode_request`].
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Decodes a request header. Only the magic can be wrong (a protocol violation: disconnect);
/// unknown commands become [`Command::Unknown`] and flags are kept raw.
///
/// ```text
/// C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
/// C: 16 bits, command flags
/// C: 16 bits, type
/// C: 64 bits, cookie
/// C: 64 bits, offset (unsigned)
/// C: 32 bits, length (unsigned)
/// C: (length bytes of data if the request is of type NBD_CMD_WRITE)
/// ```
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, CodecError> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(CodecError::BadMagic { expected: u64::from(REQUEST_MAGIC), got: u64::from(magic) });
    }
    let request = Request {
        flags: r.u16()?,
        command: Command::from(r.u16()?),
        cookie: r.u64()?,
        offset: r.u64()?,
        len: r.u32()?,
    };
    r.expect_empty()?;
    Ok(request)
}

/// A request header in its widest form: the extended header's 64-bit length, or a compact
/// header's 32-bit one widened. Whether `len` counts payload bytes that follow or the bytes of
/// the export the command acts on depends on the header style and `NBD_CMD_FLAG_PAYLOAD_LEN`;
/// that judgement belongs to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedRequest {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

/// Length of an extended request header on the wire.
pub const EXTENDED_REQUEST_LEN: usize = 32;

impl From<Request> for ExtendedRequest {
    fn from(r: Request) -> Self {
        ExtendedRequest {
            flags: r.flags,
            command: r.command,
            cookie: r.cookie,
            offset: r.offset,
            len: u64::from(r.len),
        }
    }
}

impl ExtendedRequest {
    /// Encodes the header (the client side; used by tests and fuzzing). Layout at
    /// [`decode_extended_request`].
    pub fn encode(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Decodes an extended request header (`EXTENDED_HEADERS` extension). Only the magic can be
/// wrong, as with [`decode_request`].
///
/// ```text
/// C: 32 bits, 0x21e41c71, magic (NBD_EXTENDED_REQUEST_MAGIC)
/// C: 16 bits, command flags
/// C: 16 bits, type
/// C: 64 bits, cookie
/// C: 64 bits, offset (unsigned)
/// C: 64 bits, payload/effect length (unsigned)
/// C: (length bytes of data if flags includes NBD_CMD_FLAG_PAYLOAD_LEN)
/// ```
pub fn decode_extended_request(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<ExtendedRequest, CodecError> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(CodecError::BadMagic { expected: u64::from(EXTENDED_REQUEST_MAGIC), got: u64::from(magic) });
    }
    let request = ExtendedRequest {
        flags: r.u16()?,
        command: Command::from(r.u16()?),
        cookie: r.u64()?,
        offset: r.u64()?,
        len: r.u64()?,
    };
    r.expect_empty()?;
    Ok(request)
}

/// A simple reply; for a successful read without structured replies, the data follows.
///
/// ```text
/// S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
/// S: 32 bits, error (MAY be zero)
/// S: 64 bits, cookie
/// S: (length bytes of data if the request is of type NBD_CMD_READ and error is zero)
/// ```
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The header of a structured reply chunk; `len` bytes of payload follow it.
///
/// ```text
/// S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
/// S: 16 bits, flags
/// S: 16 bits, type
/// S: 64 bits, cookie
/// S: 32 bits, length of payload (unsigned)
/// S: length bytes of payload data (if length is nonzero)
/// ```
pub fn chunk_header(flags: u16, chunk_type: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Largest `data_len` of one `NBD_REPLY_TYPE_OFFSET_DATA` chunk: the chunk length (a `u32`)
/// also counts the 8-byte offset. Longer reads must be split (the spec says so too).
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// The header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; the caller writes the
/// `data_len` bytes of data after it, so the data is never copied into a reply buffer.
/// `data_len` must be nonzero and at most [`MAX_OFFSET_DATA_LEN`].
///
/// ```text
/// chunk header, type NBD_REPLY_TYPE_OFFSET_DATA, length = 8 + data length
/// 64 bits: offset (unsigned)
/// length - 8 bytes: data
/// ```
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    debug_assert!(data_len <= MAX_OFFSET_DATA_LEN, "read chunk too long");
    let header = chunk_header(done_flag(done), REPLY_TYPE_OFFSET_DATA, cookie, data_len.saturating_add(8));
    let mut b = [0u8; 28];
    b[0..20].copy_from_slice(&header);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Appends an error chunk: `NBD_REPLY_TYPE_ERROR_OFFSET` if `offset` is given, else
/// `NBD_REPLY_TYPE_ERROR`. `error` is an NBD errno (nonzero); the message is clipped to
/// [`MAX_STRING`] bytes.
///
/// ```text
/// chunk header, type NBD_REPLY_TYPE_ERROR(_OFFSET), length = 6 + message length (+ 8)
/// 32 bits: error (MUST be nonzero)
/// 16 bits: message length
/// message length bytes: optional string suitable for direct display to a human being
/// (NBD_REPLY_TYPE_ERROR_OFFSET only) 64 bits: offset (unsigned)
/// ```
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, offset: Option<u64>, done: bool) {
    debug_assert_ne!(error, 0, "an error chunk needs a nonzero error");
    let message = clip_str(message, MAX_STRING).as_bytes();
    // At most MAX_STRING (4096) bytes: fits the u16 length and the u32 chunk length.
    let msg_len = message.len() as u16;
    let (chunk_type, extra) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
        None => (REPLY_TYPE_ERROR, 0),
    };
    let len = 6 + u32::from(msg_len) + extra;
    out.extend_from_slice(&chunk_header(done_flag(done), chunk_type, cookie, len));
    put_u32(out, error);
    put_u16(out, msg_len);
    out.extend_from_slice(message);
    if let Some(offset) = offset {
        put_u64(out, offset);
    }
}

/// The header of an extended reply chunk (`EXTENDED_HEADERS` extension); `len` bytes of
/// payload follow it. Every reply uses it once extended headers are negotiated.
///
/// ```text
/// S: 32 bits, 0x6e8a278c, magic (NBD_EXTENDED_REPLY_MAGIC)
/// S: 16 bits, reply flags
/// S: 16 bits, type
/// S: 64 bits, cookie (MUST match the request)
/// S: 64 bits, offset (MUST match the request)
/// S: 64 bits, length of payload (unsigned)
/// ```
pub fn extended_chunk_header(flags: u16, chunk_type: u16, cookie: u64, offset: u64, len: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// The extended header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk for a read at
/// `offset` (which is both the request's offset in the header and the data's offset in the
/// payload: replies are never split); the caller writes the `data_len` bytes after it.
pub fn extended_offset_data_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 40] {
    let header =
        extended_chunk_header(done_flag(done), REPLY_TYPE_OFFSET_DATA, cookie, offset, u64::from(data_len) + 8);
    let mut b = [0u8; 40];
    b[0..32].copy_from_slice(&header);
    b[32..40].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The final, empty chunk of an extended reply (also the whole reply to a command that
/// succeeded without data).
pub fn extended_done_chunk(cookie: u64, offset: u64) -> [u8; 32] {
    extended_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0)
}

/// Appends an error chunk with an extended header; payload as in [`error_chunk`].
/// `request_offset` goes in the header, `at` (an offset inside the request) makes it
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub fn extended_error_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    request_offset: u64,
    error: u32,
    message: &str,
    at: Option<u64>,
    done: bool,
) {
    let mut compact = Vec::with_capacity(64);
    error_chunk(&mut compact, cookie, error, message, at, done);
    // The compact chunk is a 20-byte header then the payload: keep the payload, swap the header.
    let payload = compact.get(20..).unwrap_or_default();
    let chunk_type = if at.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
    out.extend_from_slice(&extended_chunk_header(
        done_flag(done),
        chunk_type,
        cookie,
        request_offset,
        payload.len() as u64,
    ));
    out.extend_from_slice(payload);
}

/// One descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes (nonzero).
    pub len: u32,
    /// Status flags, as defined by the metadata context (`base:allocation`: hole 1, zero 2).
    pub flags: u32,
}

/// Most descriptors sent in one block status chunk (the spec's SHOULD-NOT-exceed bound).
pub const MAX_EXTENTS: usize = 1 << 20;

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context. Descriptors past
/// [`MAX_EXTENTS`] are dropped (the client asks again for the rest).
///
/// ```text
/// chunk header, type NBD_REPLY_TYPE_BLOCK_STATUS, length = 4 + 8 x n
/// 32 bits, metadata context ID
/// n x (32 bits, length of the extent; 32 bits, status flags)
/// ```
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context_id: u32, extents: &[Extent], done: bool) {
    let extents = extents.get(..MAX_EXTENTS).unwrap_or(extents);
    // At most 2^20 extents: 4 + 8 * 2^20 fits a u32.
    let len = 4 + 8 * extents.len() as u32;
    out.extend_from_slice(&chunk_header(done_flag(done), REPLY_TYPE_BLOCK_STATUS, cookie, len));
    put_u32(out, context_id);
    for e in extents {
        put_u32(out, e.len);
        put_u32(out, e.flags);
    }
}

/// The final, empty chunk of a structured reply.
///
/// ```text
/// chunk header, flags NBD_REPLY_FLAG_DONE, type NBD_REPLY_TYPE_NONE, length 0
/// ```
pub fn done_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is a failure with a backtrace
mod tests {
    use super::*;
    use crate::nbd::proto::{CMD_FLAG_FUA, EIO, EPERM};
    use proptest::prelude::*;

    // ---- Transmission ---------------------------------------------------------------------

    #[test]
    fn request_decodes_from_spec_layout() {
        #[rustfmt::skip]
        let b: [u8; REQUEST_LEN] = [
            0x25, 0x60, 0x95, 0x13,                         // NBD_REQUEST_MAGIC
            0x00, 0x01,                                     // NBD_CMD_FLAG_FUA
            0x00, 0x01,                                     // NBD_CMD_WRITE
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // offset 4096
            0x00, 0x00, 0x02, 0x00,                         // length 512
        ];
        assert_eq!(
            decode_request(&b),
            Ok(Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512,
            })
        );
    }

    #[test]
    fn request_round_trips() {
        let req =
            Request { flags: 0xffff, command: Command::BlockStatus, cookie: u64::MAX, offset: 1 << 40, len: u32::MAX };
        assert_eq!(decode_request(&req.encode()), Ok(req));
    }

    #[test]
    fn request_with_wrong_magic_is_bad_magic() {
        let mut b = Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, len: 1 }.encode();
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            decode_request(&b),
            Err(CodecError::BadMagic { expected: u64::from(REQUEST_MAGIC), got: u64::from(SIMPLE_REPLY_MAGIC) })
        );
    }

    #[test]
    fn unknown_command_is_unknown_with_its_code() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&0x0042u16.to_be_bytes());
        assert_eq!(decode_request(&b).unwrap().command, Command::Unknown(0x42));
    }

    #[test]
    fn command_codes_round_trip() {
        for code in 0..=16u16 {
            assert_eq!(Command::from(code).code(), code);
        }
    }

    #[test]
    fn extended_request_decodes_from_spec_layout() {
        #[rustfmt::skip]
        let b: [u8; EXTENDED_REQUEST_LEN] = [
            0x21, 0xe4, 0x1c, 0x71,                         // NBD_EXTENDED_REQUEST_MAGIC
            0x00, 0x20,                                     // NBD_CMD_FLAG_PAYLOAD_LEN
            0x00, 0x01,                                     // NBD_CMD_WRITE
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // offset 4096
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // length 4 GiB
        ];
        assert_eq!(
            decode_extended_request(&b),
            Ok(ExtendedRequest {
                flags: 0x20,
                command: Command::Write,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 1 << 32,
            })
        );
    }

    #[test]
    fn compact_magic_in_an_extended_header_is_bad_magic() {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        assert!(matches!(decode_extended_request(&b), Err(CodecError::BadMagic { .. })));
    }

    #[test]
    fn extended_reply_header_has_spec_layout() {
        #[rustfmt::skip]
        let expected = [
            0x6e, 0x8a, 0x27, 0x8c,                         // NBD_EXTENDED_REPLY_MAGIC
            0x00, 0x01,                                     // DONE
            0x00, 0x01,                                     // NBD_REPLY_TYPE_OFFSET_DATA
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // offset (the request's)
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, // length 8 + 512
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // data offset
        ];
        assert_eq!(extended_offset_data_header(9, 4096, 512, true), expected);
        assert_eq!(&extended_done_chunk(9, 4096)[4..8], &[0, 1, 0, 0]);
    }

    #[test]
    fn extended_error_chunk_has_the_compact_payload_after_a_32_byte_header() {
        let mut compact = Vec::new();
        error_chunk(&mut compact, 3, EIO, "bad", Some(4096), true);
        let mut ext = Vec::new();
        extended_error_chunk(&mut ext, 3, 4000, EIO, "bad", Some(4096), true);
        assert_eq!(&ext[32..], &compact[20..]);
        assert_eq!(&ext[..32], &extended_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, 3, 4000, 17));
    }

    #[test]
    fn simple_reply_has_spec_layout() {
        #[rustfmt::skip]
        let expected = [
            0x67, 0x44, 0x66, 0x98,                         // NBD_SIMPLE_REPLY_MAGIC
            0x00, 0x00, 0x00, 0x05,                         // EIO
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, // cookie
        ];
        assert_eq!(simple_reply(EIO, 42), expected);
    }

    #[test]
    fn done_chunk_is_none_with_done_flag() {
        #[rustfmt::skip]
        let expected = [
            0x66, 0x8e, 0x33, 0xef,                         // NBD_STRUCTURED_REPLY_MAGIC
            0x00, 0x01,                                     // NBD_REPLY_FLAG_DONE
            0x00, 0x00,                                     // NBD_REPLY_TYPE_NONE
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, // cookie
            0x00, 0x00, 0x00, 0x00,                         // length 0
        ];
        assert_eq!(done_chunk(7), expected);
    }

    #[test]
    fn offset_data_header_counts_the_offset_in_its_length() {
        let b = offset_data_header(9, 4096, 512, true);
        assert_eq!(&b[..20], &chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9, 520));
        assert_eq!(&b[20..], &4096u64.to_be_bytes());
    }

    #[test]
    fn offset_data_header_without_done_has_no_flags() {
        let b = offset_data_header(9, 0, 1, false);
        assert_eq!(&b[4..6], &[0, 0]);
    }

    #[test]
    fn error_chunk_has_spec_layout() {
        let mut out = Vec::new();
        error_chunk(&mut out, 3, EPERM, "ro", None, true);
        #[rustfmt::skip]
        let expected = [
            0x66, 0x8e, 0x33, 0xef,
            0x00, 0x01,                                     // DONE
            0x80, 0x01,                                     // NBD_REPLY_TYPE_ERROR
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
            0x00, 0x00, 0x00, 0x08,                         // 4 + 2 + 2
            0x00, 0x00, 0x00, 0x01,                         // EPERM
            0x00, 0x02, b'r', b'o',
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn error_offset_chunk_ends_with_the_offset() {
        let mut out = Vec::new();
        error_chunk(&mut out, 3, EIO, "", Some(0x1000), false);
        assert_eq!(&out[4..8], &[0, 0, 0x80, 0x02]);
        assert_eq!(&out[16..20], &[0, 0, 0, 14]);
        assert_eq!(&out[20..26], &[0, 0, 0, 5, 0, 0]);
        assert_eq!(&out[26..], &0x1000u64.to_be_bytes());
    }

    #[test]
    fn error_chunk_message_is_clipped_to_4096_bytes() {
        let mut out = Vec::new();
        error_chunk(&mut out, 1, EIO, &"x".repeat(70_000), None, true);
        assert_eq!(&out[24..26], &4096u16.to_be_bytes());
        assert_eq!(out.len(), 20 + 6 + 4096);
    }

    #[test]
    fn block_status_chunk_is_context_then_descriptors() {
        let mut out = Vec::new();
        let extents = [Extent { len: 512, flags: 0 }, Extent { len: 4096, flags: 3 }];
        block_status_chunk(&mut out, 1, 7, &extents, true);
        assert_eq!(&out[..20], &chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, 20));
        #[rustfmt::skip]
        let payload = [
            0, 0, 0, 7,
            0, 0, 0x02, 0, 0, 0, 0, 0,
            0, 0, 0x10, 0, 0, 0, 0, 3,
        ];
        assert_eq!(&out[20..], &payload);
    }

    proptest! {
        #[test]
        fn decode_request_never_panics(b in any::<[u8; REQUEST_LEN]>()) {
            let _ = decode_request(&b);
        }

        #[test]
        fn decoded_extended_requests_re_encode_to_the_same_bytes(b in any::<[u8; EXTENDED_REQUEST_LEN]>()) {
            if let Ok(req) = decode_extended_request(&b) {
                prop_assert_eq!(req.encode(), b);
            }
        }

        #[test]
        fn decoded_requests_re_encode_to_the_same_bytes(b in any::<[u8; REQUEST_LEN]>()) {
            if let Ok(req) = decode_request(&b) {
                prop_assert_eq!(req.encode(), b);
            }
        }
    }
}
