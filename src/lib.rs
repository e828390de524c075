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
//! - [`tls`]: TLS credentials (rustls on AWS-LC) for `NBD_OPT_STARTTLS` on TCP listeners.
//! - [`export`]: one served volume: geometry, the sector cipher, read-modify-write for I/O that
//!   is not sector-aligned, and the one place where failures become NBD errnos.
//! - [`errno`]: the NBD error values, below the protocol module because the export maps its
//!   failures to them and the metrics count them.
//! - [`backend`]: the raw volume (file or block device, buffered or `O_DIRECT`) behind a
//!   narrow trait, plus an in-memory fake for tests.
//! - [`buf`]: page-aligned I/O buffers and the per-connection pool that recycles them.
//! - [`crypto`]: key material types ([`crypto::VolumeKey`]) and AES-256-XTS-plain64.
//! - [`header`]: the on-disk header (two copies, sequence number, checksum, MAC, key slots).
//! - [`keys`]: key providers that wrap and unwrap the volume key (a local KEK file, AWS KMS),
//!   and the keyring that finds one for each key slot.
//! - [`identity`]: which cloud volume a device is (EBS volume id), for the header's binding.
//! - [`volume`]: opening a volume: read the header, unlock a slot, verify, build an export.
//! - [`migrate`]: moving data into, within and out of the encryption: `migrate` (copy a
//!   plaintext source into a new volume), in-place `encrypt`/`reencrypt`/`decrypt` with a tail
//!   journal, all resumable after a crash (`docs/reencryption.md`).
//! - [`cli`], [`config`], [`commands`]: the command line, the TOML config, and the commands.
//!
//! Operations, beside the data path:
//!
//! - [`metrics`]: per-export atomic counters and the KMS hook, encoded as Prometheus text;
//!   [`metrics_http`] serves them.
//! - [`control`]: the control socket protocol behind `status`, `suspend` and `resume` (the
//!   suspend gate itself is [`crypto::CipherGate`], inside the export).
//! - [`logging`]: tracing setup with a reloadable level, the log format, and
//!   [`logging::error_chain`], how an error and its causes read in logs and on exit;
//!   [`notify`]: systemd's `sd_notify`.

pub mod backend;
pub mod buf;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod crypto;
pub mod errno;
pub mod export;
pub mod hardening;
pub mod header;
pub mod identity;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod metrics_http;
pub mod migrate;
pub mod nbd;
pub mod notify;
pub mod rate_limit;
pub mod server;
pub mod tls;
pub mod units;
pub mod volume;
pub mod workers;
