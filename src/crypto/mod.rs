//! Cryptography: key material types and the sector cipher.
//!
//! - `secret`: `VolumeKey`, `Kek` (zeroizing, locked, no `Debug` bytes, not `Clone`).
//! - `xts`: AES-256-XTS-plain64 over whole sectors, on AWS-LC's `EVP_aes_256_xts`.
//! - `kdf`: HKDF/HMAC helpers deriving sub-keys (header MAC, key digest) from the volume key.

pub mod kdf;
pub mod secret;
pub mod xts;
#[cfg(test)]
mod xts_soft;

pub use secret::{Kek, Secret, VolumeKey};
pub use xts::{CipherError, SectorCipher};
