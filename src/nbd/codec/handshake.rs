//! The handshake phase: the newstyle greeting, client options and the server's replies to them
//! (`doc/proto.md`, "Option haggling").

use crate::nbd::proto::{
    IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_NAME_LEN, MAX_OPTION_LEN, MAX_STRING,
    NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_INFO, REP_MAGIC, REP_META_CONTEXT, REP_SERVER,
};

use super::{clip_str, put_bytes32, put_u16, put_u32, put_u64, string_of_len, utf8, CodecError, Reader};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is a failure with a backtrace
mod tests {
    use super::*;
    use crate::nbd::proto::{
        FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, REP_ACK, REP_ERR_INVALID,
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
