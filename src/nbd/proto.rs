//! Constants of the NBD protocol, as named in NetworkBlockDevice/nbd `doc/proto.md`.
//!
//! Names drop the spec's `NBD_` prefix and keep the rest (`NBD_OPT_GO` is [`OPT_GO`],
//! `NBD_CMD_FLAG_FUA` is [`CMD_FLAG_FUA`]). Each constant has the width of the wire field that
//! carries it, so it can be compared with a decoded field without a cast. All multi-byte values
//! travel in network byte order (big-endian); the encoding lives in [`super::codec`].

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// First word the server sends: ASCII `NBDMAGIC` (the `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42444d41474943;
/// Second word of the newstyle greeting and the first word of every client option: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x49484156454F5054;
/// First word of every fixed-newstyle option reply.
pub const REP_MAGIC: u64 = 0x3e889045565a9;
/// First word of every transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x25609513;
/// First word of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
/// First word of a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;
/// First word of an extended request (`EXTENDED_HEADERS` extension).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e41c71;
/// First word of an extended reply (`EXTENDED_HEADERS` extension).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags (16 bits, server) and client flags (32 bits, client)
// ---------------------------------------------------------------------------------------------

/// Handshake flag: the server speaks fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 0x0001;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 0x0002;

/// Client flag: the client speaks fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 0x0000_0001;
/// Client flag: the client asks the server to omit the 124 zero bytes (only if offered).
pub const FLAG_C_NO_ZEROES: u32 = 0x0000_0002;

// ---------------------------------------------------------------------------------------------
// Option codes (32 bits)
// ---------------------------------------------------------------------------------------------

/// Select an export and enter transmission; the server cannot reply with an error.
pub const OPT_EXPORT_NAME: u32 = 0x0000_0001;
/// The client gives up negotiation; the server acknowledges and both sides close.
pub const OPT_ABORT: u32 = 0x0000_0002;
/// List the exports: `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
pub const OPT_LIST: u32 = 0x0000_0003;
/// Upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 0x0000_0005;
/// Describe an export without selecting it.
pub const OPT_INFO: u32 = 0x0000_0006;
/// Describe an export and enter transmission with it (`NBD_OPT_EXPORT_NAME` that can fail).
pub const OPT_GO: u32 = 0x0000_0007;
/// Use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 0x0000_0008;
/// List the metadata contexts of an export matching some queries.
pub const OPT_LIST_META_CONTEXT: u32 = 0x0000_0009;
/// Select the metadata contexts that `NBD_CMD_BLOCK_STATUS` reports.
pub const OPT_SET_META_CONTEXT: u32 = 0x0000_000a;
/// Use 32-byte extended request and reply headers (`EXTENDED_HEADERS` extension).
pub const OPT_EXTENDED_HEADERS: u32 = 0x0000_000b;

// ---------------------------------------------------------------------------------------------
// Option reply types (32 bits); errors have bit 31 set
// ---------------------------------------------------------------------------------------------

/// The option succeeded, or a list of replies is complete. No data.
pub const REP_ACK: u32 = 0x0000_0001;
/// One export in reply to `NBD_OPT_LIST`: name length, name, description.
pub const REP_SERVER: u32 = 0x0000_0002;
/// One item of export information in reply to `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 0x0000_0003;
/// One metadata context: context id, then its name.
pub const REP_META_CONTEXT: u32 = 0x0000_0004;

/// Bit 31, set on every error reply type.
pub const REP_FLAG_ERROR: u32 = 0x8000_0000;
/// The option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 0x0000_0001;
/// The option is known and valid, but server policy forbids it.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 0x0000_0002;
/// The option is known but syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 0x0000_0003;
/// The option is not supported on this platform or build.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 0x0000_0004;
/// The server requires TLS before this option.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 0x0000_0005;
/// The requested export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 0x0000_0006;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 0x0000_0007;
/// The client must request `NBD_INFO_BLOCK_SIZE` before entering transmission.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 0x0000_0008;
/// The request or its reply is too large to process.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 0x0000_0009;
/// The client must negotiate extended headers first (`EXTENDED_HEADERS` extension).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 0x0000_000a;

// ---------------------------------------------------------------------------------------------
// Information types (16 bits) in `NBD_OPT_INFO`/`NBD_OPT_GO` requests and `NBD_REP_INFO`
// ---------------------------------------------------------------------------------------------

/// Export size and transmission flags; mandatory before a successful `NBD_REP_ACK`.
pub const INFO_EXPORT: u16 = 0x0000;
/// The server's canonical name of the export.
pub const INFO_NAME: u16 = 0x0001;
/// A human-readable description of the export.
pub const INFO_DESCRIPTION: u16 = 0x0002;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 0x0003;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits), sent with the export size
// ---------------------------------------------------------------------------------------------

/// Always set: the other transmission flags are meaningful.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only; writes fail with `EPERM`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// The server supports `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server supports `NBD_CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Hint: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// The server supports `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// The server supports `NBD_CMD_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The server supports `NBD_CMD_FLAG_DF` on reads (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are visible across all connections to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The server supports `NBD_CMD_RESIZE` (`RESIZE` extension).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// The server supports `NBD_CMD_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// The server supports `NBD_CMD_FLAG_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// The server accepts a payload on `NBD_CMD_BLOCK_STATUS` (`EXTENDED_HEADERS` extension).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Commands (16 bits, the request's "type")
// ---------------------------------------------------------------------------------------------

/// Read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0x0000;
/// Write the `length` bytes that follow the request at `offset`.
pub const CMD_WRITE: u16 = 0x0001;
/// Disconnect after handling outstanding requests; no reply.
pub const CMD_DISC: u16 = 0x0002;
/// Make every write already replied to durable.
pub const CMD_FLUSH: u16 = 0x0003;
/// Hint that a range is no longer needed.
pub const CMD_TRIM: u16 = 0x0004;
/// Hint to prefetch a range into the server's cache.
pub const CMD_CACHE: u16 = 0x0005;
/// Write zeroes to a range without a payload.
pub const CMD_WRITE_ZEROES: u16 = 0x0006;
/// Report the status of a range for the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 0x0007;
/// Change the export size (`RESIZE` extension).
pub const CMD_RESIZE: u16 = 0x0008;

// ---------------------------------------------------------------------------------------------
// Command flags (16 bits)
// ---------------------------------------------------------------------------------------------

/// Force unit access: reply only once the written data is durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`: do not punch a hole, allocate the zeroes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_READ`: don't fragment, send at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS`: return one extent per context only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES`: fail with `ENOTSUP` unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// The request carries a payload of `length` bytes (`EXTENDED_HEADERS` extension).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured replies: flags and chunk types (16 bits each)
// ---------------------------------------------------------------------------------------------

/// This chunk is the last one of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Empty chunk, only valid with `NBD_REPLY_FLAG_DONE`.
pub const REPLY_TYPE_NONE: u16 = 0x0000;
/// Offset followed by data read at that offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 0x0001;
/// Offset and size of a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 0x0002;
/// Context id followed by (length, status) extent descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 0x0005;
/// Bit 15, set on every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 0x8000;
/// Error with an optional message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 0x0001;
/// Error with an optional message, at a given offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 0x0002;

// ---------------------------------------------------------------------------------------------
// Error values (32 bits) of simple replies and error chunks: defined in `crate::errno`, below
// this module, because the export and the metrics name them too.
// ---------------------------------------------------------------------------------------------

pub use crate::errno::{EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// Largest option payload this server reads. The spec caps strings at 4096 bytes, so the
/// largest legitimate option (a few names and queries) is far smaller; the bound is checked
/// against the option header before the payload is allocated.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest option payload this server reads and throws away, to answer
/// `NBD_REP_ERR_TOO_BIG` as the spec prefers; an option claiming more is taken for a denial
/// of service and the connection is closed (the spec allows a hard disconnect then).
pub const MAX_OPTION_DISCARD: u32 = 8 << 20;
/// Longest export name, in bytes (the spec's limit for any string).
pub const MAX_NAME_LEN: usize = 4096;
/// Longest string (description, query, error message), in bytes.
pub const MAX_STRING: usize = 4096;
