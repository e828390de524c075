//! nbdcrypt: an encrypted block device served over NBD, with the volume key wrapped by a
//! key provider (a local KEK file, or AWS KMS).
//!
//! # Layout
//!
//! From the wire down to the disk:
//!
//! - [`nbd`]: the NBD protocol. [`nbd::proto`] holds the constants of `doc/proto.md`,
//!   [`nbd::codec`] turns bytes into typed values and back (pure: no I/O, no tokio),
//!   [`nbd::handshake`] and [`nbd::transmission`] drive one connection over any async stream.
//! - [`server`]: listeners (TCP, Unix), the connection cap, and a shutdown that drains
//!   in-flight requests and flushes before exit.
//! - [`export`]: one served volume: geometry, the sector cipher, read-modify-write for I/O that
//!   is not sector-aligned, and the one place where failures become NBD errnos.
//! - [`backend`]: the raw volume (file or block device, buffered or `O_DIRECT`) behind a
//!   narrow trait, plus an in-memory fake for tests.
//! - [`buf`]: page-aligned I/O buffers and the per-connection pool that recycles them.
//! - [`crypto`]: key material types ([`crypto::VolumeKey`]) and AES-256-XTS-plain64.
//! - [`header`]: the on-disk header (two copies, sequence number, checksum, MAC, key slots).
//! - [`keys`]: key providers that wrap and unwrap the volume key (a local KEK file, AWS KMS),
//!   and the keyring that finds one for each key slot.
//! - [`identity`]: which cloud volume a device is (EBS volume id), for the header's binding.
//! - [`volume`]: opening a volume: read the header, unlock a slot, verify, build an export.
//! - [`cli`], [`config`], [`commands`]: the command line, the TOML config, and the commands.

pub mod backend;
pub mod buf;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod export;
pub mod hardening;
pub mod header;
pub mod identity;
pub mod keys;
pub mod nbd;
pub mod server;
pub mod units;
pub mod volume;
