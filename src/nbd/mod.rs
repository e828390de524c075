//! The NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`), fixed newstyle only.
//!
//! - [`proto`]: the numbers of the spec.
//! - [`codec`]: bytes to typed values and back; pure, fuzzed, no I/O.
//! - [`handshake`]: option haggling up to the choice of an export, over any async stream.
//! - [`transmission`]: the request loop of one connection: many requests in flight, replies
//!   serialised by one writer, a drain before close.

pub mod codec;
pub mod handshake;
pub mod proto;
pub mod transmission;
