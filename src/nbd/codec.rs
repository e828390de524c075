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

use super::proto::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_RESIZE, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME,
    MAX_NAME_LEN, MAX_OPTION_LEN, MAX_STRING, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REP_INFO, REP_MAGIC, REP_META_CONTEXT, REP_SERVER, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

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
    /// A length is over its limit (the spec's 4096 bytes for strings, or [`MAX_OPTION_LEN`]).
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

// =============================================================================================
// Handshake
// =============================================================================================

/// The newstyle greeting.
///
/// ```text
/// S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC')
/// S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
/// S: 16 bits, handshake flags
/// ```
pub fn server_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// The client's answer to the greeting.
///
/// ```text
/// C: 32 bits, client flags
/// ```
pub fn client_flags(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// The fixed part of a client option; `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

/// Length of an option header on the wire.
pub const OPTION_HEADER_LEN: usize = 16;

/// Decodes an option header. Only the magic can be wrong; the caller bounds `len` by
/// [`MAX_OPTION_LEN`] before reading the data.
///
/// ```text
/// C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
/// C: 32 bits, option
/// C: 32 bits, length of option data (unsigned)
/// C: any data needed for the chosen option, of length as specified above
/// ```
pub fn option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, CodecError> {
    let mut r = Reader::new(b);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic { expected: IHAVEOPT, got: magic });
    }
    let header = OptionHeader { code: r.u32()?, len: r.u32()? };
    r.expect_empty()?;
    Ok(header)
}

/// Encodes a client option, header and data (the client side; used by tests and fuzzing).
/// Data longer than `u32::MAX` bytes is cut so the length field stays true.
pub fn option_request(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    put_u64(out, IHAVEOPT);
    put_u32(out, option);
    put_bytes32(out, data);
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: select this export and enter transmission (no error reply is
    /// possible; refusing means disconnecting).
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaQuery),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option code; the server replies `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

impl ClientOption {
    /// The option code, as echoed in every reply to this option.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
        }
    }

    /// Encodes the whole option, header included (the client side). `Unknown` has no data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            ClientOption::Info(req) | ClientOption::Go(req) => req.encode(&mut data),
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => q.encode(&mut data),
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply
            | ClientOption::ExtendedHeaders
            | ClientOption::Unknown(_) => {}
        }
        option_request(out, self.code(), &data);
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export; empty means the default export.
    pub name: String,
    /// `NBD_INFO_*` items the client asks for, raw (the server ignores ones it doesn't know).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// ```text
    /// C: 32 bits, length of name (unsigned); MUST be no larger than the option data length - 6
    /// C: String: name of the export
    /// C: 16 bits, number of information requests
    /// C: 16 bits x n - list of NBD_INFO information requests
    /// ```
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let name_len = r.u32()?;
        let name = string_of_len(
            r,
            name_len,
            "export name",
            MAX_NAME_LEN,
            2,
            "export name length runs past the end of the option data",
        )?;
        let count = usize::from(r.u16()?);
        if count.saturating_mul(2) != r.remaining() {
            return Err(CodecError::Invalid("information request count does not match the option length"));
        }
        let requests = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
        Ok(InfoRequest { name, requests })
    }

    /// Appends the option data (layout at `decode`). Lists longer than `u16::MAX` are cut.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_bytes32(out, self.name.as_bytes());
        let requests = self.requests.get(..usize::from(u16::MAX)).unwrap_or(&self.requests);
        put_u16(out, u16::try_from(requests.len()).unwrap_or(u16::MAX));
        for &item in requests {
            put_u16(out, item);
        }
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    pub export: String,
    /// Query strings (`namespace:leaf`); syntax is the caller's concern.
    pub queries: Vec<String>,
}

impl MetaQuery {
    /// ```text
    /// C: 32 bits, length of export name
    /// C: String, name of export
    /// C: 32 bits, number of queries
    /// C: zero or more queries, each being:
    ///    32 bits, length of query
    ///    String, query
    /// ```
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let name_len = r.u32()?;
        let export = string_of_len(
            r,
            name_len,
            "export name",
            MAX_NAME_LEN,
            4,
            "export name length runs past the end of the option data",
        )?;
        let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        // Each query takes at least its 4-byte length: bounds the count before allocating.
        if count > r.remaining() / 4 {
            return Err(CodecError::Invalid("query count is larger than the option data can hold"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.u32()?;
            queries.push(string_of_len(
                r,
                len,
                "query",
                MAX_STRING,
                0,
                "query length runs past the end of the option data",
            )?);
        }
        Ok(MetaQuery { export, queries })
    }

    /// Appends the option data (layout at `decode`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_bytes32(out, self.export.as_bytes());
        let queries = self.queries.get(..u32::MAX as usize).unwrap_or(&self.queries);
        put_u32(out, u32::try_from(queries.len()).unwrap_or(u32::MAX));
        for q in queries {
            put_bytes32(out, q.as_bytes());
        }
    }
}

/// Decodes the data of an option whose header carried `code`.
///
/// The caller has already bounded the data by [`MAX_OPTION_LEN`] (checked again here). An
/// error means "reply `NBD_REP_ERR_INVALID` and continue", not disconnect (except after
/// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error). Options that take no data
/// (`LIST`, `STARTTLS`, `STRUCTURED_REPLY`, `EXTENDED_HEADERS`) must have none; `ABORT`
/// ignores any (the spec says so). Names
/// and queries must be UTF-8 without NUL, at most 4096 bytes. Unknown codes decode to
/// [`ClientOption::Unknown`] whatever their data.
///
/// ```text
/// NBD_OPT_EXPORT_NAME: String, name of the export (the whole option data)
/// NBD_OPT_INFO / NBD_OPT_GO: see InfoRequest
/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: see MetaQuery
/// ```
pub fn decode_option(code: u32, data: &[u8]) -> Result<ClientOption, CodecError> {
    let max = MAX_OPTION_LEN as usize;
    if data.len() > max {
        return Err(CodecError::TooLong { field: "option data", len: data.len(), max });
    }
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(CodecError::Invalid("this option takes no data"))
        }
    };
    let mut r = Reader::new(data);
    let option = match code {
        OPT_EXPORT_NAME => {
            let name = r.rest();
            if name.len() > MAX_NAME_LEN {
                return Err(CodecError::TooLong { field: "export name", len: name.len(), max: MAX_NAME_LEN });
            }
            ClientOption::ExportName(utf8("export name", name)?)
        }
        // "a server SHOULD ignore any data sent by the client rather than rejecting" ABORT.
        OPT_ABORT => return Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List)?,
        OPT_STARTTLS => no_data(ClientOption::StartTls)?,
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply)?,
        OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders)?,
        OPT_INFO => ClientOption::Info(InfoRequest::decode(&mut r)?),
        OPT_GO => ClientOption::Go(InfoRequest::decode(&mut r)?),
        OPT_LIST_META_CONTEXT => ClientOption::ListMetaContext(MetaQuery::decode(&mut r)?),
        OPT_SET_META_CONTEXT => ClientOption::SetMetaContext(MetaQuery::decode(&mut r)?),
        other => return Ok(ClientOption::Unknown(other)),
    };
    r.expect_empty()?;
    Ok(option)
}

/// Appends an option reply.
///
/// ```text
/// S: 64 bits, 0x3e889045565a9 (magic number for replies)
/// S: 32 bits, the option as sent by the client to which this is a reply
/// S: 32 bits, reply type (e.g., NBD_REP_ACK)
/// S: 32 bits, length of the reply
/// S: any data as required by the reply
/// ```
///
/// Data longer than `u32::MAX` bytes is cut so the length field stays true.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    put_u64(out, REP_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_bytes32(out, data);
}

/// Appends an option reply header announcing `len` bytes of data, which the caller appends.
fn option_reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, len: u32) {
    put_u64(out, REP_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, len);
}

/// Appends an error reply (`reply_type` is one of `NBD_REP_ERR_*`) whose data is a message for
/// a human, clipped to [`MAX_STRING`] bytes.
pub fn rep_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    option_reply(out, option, reply_type, clip_str(message, MAX_STRING).as_bytes());
}

/// Appends `NBD_REP_SERVER`, one export in reply to `NBD_OPT_LIST`. Name and description are
/// clipped to [`MAX_STRING`] bytes; an empty description is simply omitted.
///
/// ```text
/// 32 bits, length of name (unsigned); MUST be no larger than the reply packet header length - 4
/// String, name of the export
/// (rest of the data) String, description suitable for direct display to a human being
/// ```
pub fn rep_server(out: &mut Vec<u8>, option: u32, name: &str, description: &str) {
    let name = clip_str(name, MAX_STRING).as_bytes();
    let description = clip_str(description, MAX_STRING).as_bytes();
    // Both at most MAX_STRING bytes: the sum fits a u32.
    let name_len = name.len() as u32;
    let len = 4 + name_len + description.len() as u32;
    option_reply_header(out, option, REP_SERVER, len);
    put_u32(out, name_len);
    out.extend_from_slice(name);
    out.extend_from_slice(description);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
///
/// ```text
/// (reply length 12)
/// 16 bits, NBD_INFO_EXPORT
/// 64 bits, size of the export in bytes (unsigned)
/// 16 bits, transmission flags
/// ```
pub fn info_export(out: &mut Vec<u8>, option: u32, size: u64, tflags: u16) {
    option_reply_header(out, option, REP_INFO, 12);
    put_u16(out, INFO_EXPORT);
    put_u64(out, size);
    put_u16(out, tflags);
}

/// Appends an `NBD_REP_INFO` whose payload is a type and a string clipped to [`MAX_STRING`].
fn info_string(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    let text = clip_str(text, MAX_STRING).as_bytes();
    // At most MAX_STRING bytes: fits a u32.
    option_reply_header(out, option, REP_INFO, 2 + text.len() as u32);
    put_u16(out, info_type);
    out.extend_from_slice(text);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_NAME`, the canonical name of the export.
///
/// ```text
/// (reply length 2 + name length)
/// 16 bits, NBD_INFO_NAME
/// String: name of the export, length - 2 bytes
/// ```
pub fn info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    info_string(out, option, INFO_NAME, name);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
///
/// ```text
/// (reply length 2 + description length)
/// 16 bits, NBD_INFO_DESCRIPTION
/// String: description of the export, length - 2 bytes
/// ```
pub fn info_description(out: &mut Vec<u8>, option: u32, text: &str) {
    info_string(out, option, INFO_DESCRIPTION, text);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
///
/// ```text
/// (reply length 14)
/// 16 bits, NBD_INFO_BLOCK_SIZE
/// 32 bits, minimum block size
/// 32 bits, preferred block size
/// 32 bits, maximum payload size
/// ```
pub fn info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    option_reply_header(out, option, REP_INFO, 14);
    put_u16(out, INFO_BLOCK_SIZE);
    put_u32(out, min);
    put_u32(out, preferred);
    put_u32(out, max);
}

/// Appends `NBD_REP_META_CONTEXT`; the name is clipped to [`MAX_STRING`] bytes.
///
/// ```text
/// 32 bits, NBD metadata context ID
/// String, name of the metadata context
/// ```
pub fn rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let name = clip_str(name, MAX_STRING).as_bytes();
    // At most MAX_STRING bytes: fits a u32.
    option_reply_header(out, option, REP_META_CONTEXT, 4 + name.len() as u32);
    put_u32(out, id);
    out.extend_from_slice(name);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME` (no option reply header).
///
/// ```text
/// S: 64 bits, size of the export in bytes (unsigned)
/// S: 16 bits, transmission flags
/// S: 124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)
/// ```
pub fn export_name_reply(out: &mut Vec<u8>, size: u64, tflags: u16, no_zeroes: bool) {
    put_u64(out, size);
    put_u16(out, tflags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// =============================================================================================
// Transmission
// =============================================================================================

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
    use crate::nbd::proto::{
        CMD_FLAG_FUA, EIO, EPERM, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, REP_ACK,
        REP_ERR_INVALID,
    };
    use proptest::prelude::*;

    /// INFO/GO data with a given declared name length, name bytes and items.
    fn info_data(declared_len: u32, name: &[u8], count: u16, items: &[u16]) -> Vec<u8> {
        let mut d = declared_len.to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&count.to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

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

    // ---- Handshake: exact bytes -----------------------------------------------------------

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        let g = server_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
        expected.extend_from_slice(&[0x00, 0x03]);
        assert_eq!(&g[..], &expected[..]);
    }

    #[test]
    fn client_flags_are_big_endian() {
        assert_eq!(client_flags([0, 0, 0, 3]), 3);
        assert_eq!(client_flags([0x80, 0, 0, 0]), 0x8000_0000);
    }

    #[test]
    fn option_header_decodes_code_and_length() {
        let mut arr = [0u8; 16];
        arr[..8].copy_from_slice(b"IHAVEOPT");
        arr[8..].copy_from_slice(&[0, 0, 0, 7, 0, 0, 0x01, 0x02]);
        assert_eq!(option_header(&arr), Ok(OptionHeader { code: 7, len: 0x0102 }));
    }

    #[test]
    fn option_header_with_wrong_magic_is_bad_magic() {
        let mut arr = [0u8; 16];
        arr[..8].copy_from_slice(b"NBDMAGIC");
        assert_eq!(option_header(&arr), Err(CodecError::BadMagic { expected: IHAVEOPT, got: NBDMAGIC }));
    }

    #[test]
    fn ack_reply_has_spec_layout() {
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        #[rustfmt::skip]
        let expected = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // reply magic
            0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
            0x00, 0x00, 0x00, 0x01,                         // NBD_REP_ACK
            0x00, 0x00, 0x00, 0x00,                         // no data
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn error_reply_carries_its_message_and_error_bit() {
        let mut out = Vec::new();
        rep_error(&mut out, OPT_LIST, REP_ERR_INVALID, "no");
        assert_eq!(&out[12..16], &[0x80, 0, 0, 3]);
        assert_eq!(&out[16..20], &[0, 0, 0, 2]);
        assert_eq!(&out[20..], b"no");
    }

    #[test]
    fn rep_server_has_name_length_name_description() {
        let mut out = Vec::new();
        rep_server(&mut out, OPT_LIST, "vol", "disk");
        #[rustfmt::skip]
        let expected = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
            0x00, 0x00, 0x00, 0x03,                         // NBD_OPT_LIST
            0x00, 0x00, 0x00, 0x02,                         // NBD_REP_SERVER
            0x00, 0x00, 0x00, 0x0b,                         // 4 + 3 + 4
            0x00, 0x00, 0x00, 0x03, b'v', b'o', b'l',
            b'd', b'i', b's', b'k',
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn info_export_has_spec_layout() {
        let mut out = Vec::new();
        info_export(&mut out, OPT_GO, 0x1_0000_0000, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
        #[rustfmt::skip]
        let expected = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
            0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
            0x00, 0x00, 0x00, 0x03,                         // NBD_REP_INFO
            0x00, 0x00, 0x00, 0x0c,                         // length 12
            0x00, 0x00,                                     // NBD_INFO_EXPORT
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // size 4 GiB
            0x00, 0x03,                                     // HAS_FLAGS | READ_ONLY
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn info_name_and_description_are_type_then_text() {
        let mut out = Vec::new();
        info_name(&mut out, OPT_INFO, "a");
        info_description(&mut out, OPT_INFO, "bc");
        assert_eq!(&out[16..20], &[0, 0, 0, 3]);
        assert_eq!(&out[20..23], &[0, 1, b'a']);
        assert_eq!(&out[23 + 16..23 + 20], &[0, 0, 0, 4]);
        assert_eq!(&out[23 + 20..], &[0, 2, b'b', b'c']);
    }

    #[test]
    fn info_block_size_is_fourteen_bytes() {
        let mut out = Vec::new();
        info_block_size(&mut out, OPT_GO, 1, 4096, 32 << 20);
        assert_eq!(&out[16..20], &[0, 0, 0, 14]);
        #[rustfmt::skip]
        let payload = [
            0x00, 0x03,
            0x00, 0x00, 0x00, 0x01,
            0x00, 0x00, 0x10, 0x00,
            0x02, 0x00, 0x00, 0x00,
        ];
        assert_eq!(&out[20..], &payload);
    }

    #[test]
    fn meta_context_reply_is_id_then_name() {
        let mut out = Vec::new();
        rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 1, "base:allocation");
        assert_eq!(&out[12..16], &[0, 0, 0, 4]);
        assert_eq!(&out[16..20], &[0, 0, 0, 19]);
        assert_eq!(&out[20..24], &[0, 0, 0, 1]);
        assert_eq!(&out[24..], b"base:allocation");
    }

    #[test]
    fn export_name_reply_pads_124_zeroes_unless_no_zeroes() {
        let mut padded = Vec::new();
        export_name_reply(&mut padded, 512, FLAG_HAS_FLAGS, false);
        let mut bare = Vec::new();
        export_name_reply(&mut bare, 512, FLAG_HAS_FLAGS, true);
        assert_eq!(bare, [0, 0, 0, 0, 0, 0, 0x02, 0x00, 0x00, 0x01]);
        assert_eq!(padded.len(), 8 + 2 + 124);
        assert_eq!(&padded[..10], &bare[..]);
        assert!(padded[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn server_strings_are_clipped_to_4096_bytes_on_a_char_boundary() {
        let long = "é".repeat(3000); // 6000 bytes, 2 per char
        let mut out = Vec::new();
        info_name(&mut out, OPT_GO, &long);
        assert_eq!(&out[16..20], &(2u32 + 4096).to_be_bytes());
        assert!(std::str::from_utf8(&out[22..]).is_ok());
    }

    // ---- Options: decoding ----------------------------------------------------------------

    #[test]
    fn export_name_is_the_whole_payload() {
        assert_eq!(decode_option(OPT_EXPORT_NAME, b"disk0"), Ok(ClientOption::ExportName("disk0".into())));
    }

    #[test]
    fn empty_export_name_is_the_default_export() {
        assert_eq!(decode_option(OPT_EXPORT_NAME, b""), Ok(ClientOption::ExportName(String::new())));
    }

    #[test]
    fn export_name_of_5000_bytes_is_too_long() {
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, &[b'a'; 5000]),
            Err(CodecError::TooLong { field: "export name", len: 5000, max: MAX_NAME_LEN })
        );
    }

    #[test]
    fn export_name_must_be_utf8() {
        assert_eq!(decode_option(OPT_EXPORT_NAME, &[0xff, 0xfe]), Err(CodecError::BadUtf8 { field: "export name" }));
    }

    #[test]
    fn export_name_with_nul_is_invalid() {
        assert!(matches!(decode_option(OPT_EXPORT_NAME, b"a\0b"), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn options_without_data_decode_when_empty() {
        assert_eq!(decode_option(OPT_ABORT, &[]), Ok(ClientOption::Abort));
        assert_eq!(decode_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert_eq!(decode_option(OPT_STARTTLS, &[]), Ok(ClientOption::StartTls));
        assert_eq!(decode_option(OPT_STRUCTURED_REPLY, &[]), Ok(ClientOption::StructuredReply));
        assert_eq!(decode_option(OPT_EXTENDED_HEADERS, &[]), Ok(ClientOption::ExtendedHeaders));
    }

    #[test]
    fn abort_ignores_its_data() {
        assert_eq!(decode_option(OPT_ABORT, b"bye"), Ok(ClientOption::Abort));
    }

    #[test]
    fn options_without_data_are_invalid_with_data() {
        for code in [OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS] {
            assert!(matches!(decode_option(code, &[0]), Err(CodecError::Invalid(_))), "option {code}");
        }
    }

    #[test]
    fn unknown_option_is_unknown_with_its_code() {
        assert_eq!(decode_option(4, b"junk"), Ok(ClientOption::Unknown(4)));
        assert_eq!(decode_option(0xdead_beef, &[]), Ok(ClientOption::Unknown(0xdead_beef)));
    }

    #[test]
    fn option_data_over_the_limit_is_too_long() {
        let data = vec![0u8; MAX_OPTION_LEN as usize + 1];
        assert!(matches!(decode_option(OPT_GO, &data), Err(CodecError::TooLong { field: "option data", .. })));
    }

    #[test]
    fn go_decodes_name_and_requests() {
        let data = info_data(3, b"vol", 2, &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            decode_option(OPT_GO, &data),
            Ok(ClientOption::Go(InfoRequest { name: "vol".into(), requests: vec![INFO_NAME, INFO_BLOCK_SIZE] }))
        );
    }

    #[test]
    fn info_decodes_like_go() {
        let data = info_data(0, b"", 0, &[]);
        assert_eq!(
            decode_option(OPT_INFO, &data),
            Ok(ClientOption::Info(InfoRequest { name: String::new(), requests: vec![] }))
        );
    }

    #[test]
    fn info_name_length_past_the_payload_is_invalid() {
        let data = info_data(100, b"vol", 0, &[]);
        assert!(matches!(decode_option(OPT_INFO, &data), Err(CodecError::Invalid(_))));
        assert!(matches!(decode_option(OPT_GO, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn info_name_length_eating_the_count_is_invalid() {
        // Name length 5 covers "vol" and the 2-byte count: the spec's "length - 6" bound.
        let data = info_data(5, b"vol", 0, &[]);
        assert!(matches!(decode_option(OPT_GO, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn info_name_of_5000_bytes_is_too_long() {
        let data = info_data(5000, &[b'a'; 5000], 0, &[]);
        assert_eq!(
            decode_option(OPT_GO, &data),
            Err(CodecError::TooLong { field: "export name", len: 5000, max: MAX_NAME_LEN })
        );
    }

    #[test]
    fn info_request_count_above_the_payload_is_invalid() {
        let data = info_data(0, b"", 3, &[INFO_NAME]);
        assert!(matches!(decode_option(OPT_GO, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn info_request_count_below_the_payload_is_invalid() {
        let data = info_data(0, b"", 1, &[INFO_NAME, INFO_DESCRIPTION]);
        assert!(matches!(decode_option(OPT_GO, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn info_shorter_than_its_name_length_field_is_truncated() {
        assert!(matches!(decode_option(OPT_GO, &[0, 0]), Err(CodecError::Truncated { .. })));
    }

    #[test]
    fn meta_query_decodes_export_and_queries() {
        let q = MetaQuery { export: "vol".into(), queries: vec!["base:allocation".into(), "x-a:".into()] };
        let mut data = Vec::new();
        q.encode(&mut data);
        assert_eq!(decode_option(OPT_SET_META_CONTEXT, &data), Ok(ClientOption::SetMetaContext(q.clone())));
        assert_eq!(decode_option(OPT_LIST_META_CONTEXT, &data), Ok(ClientOption::ListMetaContext(q)));
    }

    #[test]
    fn meta_query_count_beyond_the_payload_is_invalid_without_allocating() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_option(OPT_SET_META_CONTEXT, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn meta_query_length_past_the_payload_is_invalid() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&10u32.to_be_bytes());
        data.extend_from_slice(b"base:");
        assert!(matches!(decode_option(OPT_LIST_META_CONTEXT, &data), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn meta_query_with_trailing_bytes_is_rejected() {
        let mut data = Vec::new();
        MetaQuery { export: String::new(), queries: vec![] }.encode(&mut data);
        data.push(0);
        assert_eq!(decode_option(OPT_SET_META_CONTEXT, &data), Err(CodecError::TrailingBytes { offset: 8, count: 1 }));
    }

    #[test]
    fn client_option_round_trips_through_header_and_data() {
        let opt = ClientOption::Go(InfoRequest { name: "vol".into(), requests: vec![INFO_EXPORT] });
        let mut wire = Vec::new();
        opt.encode(&mut wire);
        let header = option_header(wire[..16].try_into().unwrap()).unwrap();
        assert_eq!(header.code, OPT_GO);
        assert_eq!(header.len as usize, wire.len() - 16);
        assert_eq!(decode_option(header.code, &wire[16..]), Ok(opt));
    }

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

    // ---- Properties -----------------------------------------------------------------------

    /// Strings the spec allows: UTF-8 without NUL.
    fn spec_string() -> impl Strategy<Value = String> {
        "[^\\x00]{0,40}"
    }

    fn option_code() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..16, any::<u32>()]
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

        #[test]
        fn decode_option_never_panics(
            code in option_code(),
            data in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = decode_option(code, &data);
        }

        #[test]
        fn decode_option_never_panics_on_info_shaped_data(
            name_len in prop_oneof![0u32..64, any::<u32>()],
            body in proptest::collection::vec(any::<u8>(), 0..128),
            code in prop_oneof![Just(OPT_INFO), Just(OPT_GO),
                Just(OPT_LIST_META_CONTEXT), Just(OPT_SET_META_CONTEXT)],
        ) {
            let mut data = name_len.to_be_bytes().to_vec();
            data.extend_from_slice(&body);
            let _ = decode_option(code, &data);
        }

        #[test]
        fn info_request_round_trips(
            name in spec_string(),
            requests in proptest::collection::vec(any::<u16>(), 0..16),
            go in any::<bool>(),
        ) {
            let req = InfoRequest { name, requests };
            let (code, opt) = if go {
                (OPT_GO, ClientOption::Go(req.clone()))
            } else {
                (OPT_INFO, ClientOption::Info(req.clone()))
            };
            let mut data = Vec::new();
            req.encode(&mut data);
            prop_assert_eq!(decode_option(code, &data), Ok(opt));
        }

        #[test]
        fn meta_query_round_trips(
            export in spec_string(),
            queries in proptest::collection::vec(spec_string(), 0..8),
        ) {
            let q = MetaQuery { export, queries };
            let mut data = Vec::new();
            q.encode(&mut data);
            prop_assert_eq!(
                decode_option(OPT_LIST_META_CONTEXT, &data),
                Ok(ClientOption::ListMetaContext(q))
            );
        }

        #[test]
        fn options_round_trip_through_the_wire(name in spec_string()) {
            let opt = ClientOption::ExportName(name);
            let wire = {
                let mut w = Vec::new();
                opt.encode(&mut w);
                w
            };
            let header = option_header(wire[..16].try_into().unwrap()).unwrap();
            prop_assert_eq!(decode_option(header.code, &wire[16..]), Ok(opt));
        }
    }

    #[test]
    fn option_request_is_ihaveopt_code_length_data() {
        let mut out = Vec::new();
        option_request(&mut out, OPT_EXPORT_NAME, b"ab");
        let mut expected = b"IHAVEOPT".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b']);
        assert_eq!(out, expected);
    }
}
