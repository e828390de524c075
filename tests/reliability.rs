//! The reliability and security suite (issue 8): crash consistency under SIGKILL and power
//! cuts, faults of the raw volume, key hygiene, and a soak.
//!
//! Short versions run with `cargo test` (and so in `tests/run.sh`); `tests/long.sh` runs the
//! long versions (`NBDCRYPT_LONG=1`) and records their figures for the README's
//! "Reliability" table. Each area is a module under `tests/reliability/`.

#![allow(clippy::unwrap_used)]

mod common;

#[path = "reliability/harness.rs"]
mod harness;

#[path = "reliability/crash.rs"]
mod crash;
#[path = "reliability/faults.rs"]
mod faults;
#[path = "reliability/keys.rs"]
mod keys;
#[path = "reliability/soak.rs"]
mod soak;
