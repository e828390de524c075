//! Cryptography: key material types and the sector cipher.
//!
//! - `secret`: `VolumeKey`, `Kek` (zeroizing, locked, no `Debug` bytes, not `Clone`).
//! - `xts`: AES-256-XTS-plain64 over whole sectors (the wide engine, or AWS-LC's
//!   `EVP_aes_256_xts`).
//! - `xts_wide`: the same XTS on VAES/AVX-512, many sectors per call; `xts` runs it where the
//!   CPU has it.
//! - `gate`: the sector cipher behind a suspend/resume gate (the key can be dropped and given
//!   back while the volume stays served).
//! - `mlock`: counted page locks for every allocation that holds key bytes.
//! - `kdf`: HKDF/HMAC helpers deriving sub-keys (header MAC, key digest) from the volume key.

pub mod gate;
pub mod kdf;
pub mod mlock;
pub mod secret;
pub mod xts;
#[cfg(test)]
mod xts_soft;
#[cfg(target_arch = "x86_64")]
pub(crate) mod xts_wide;

pub use gate::{CipherGate, GateError, GateState};
pub use secret::{Kek, Secret, VolumeKey};
pub use xts::{is_zero, live_contexts, CipherEngine, CipherError, SectorCipher};
