//! Key material: fixed-size secrets that zeroize on drop, live in locked memory where the OS
//! allows, never print their bytes and cannot be cloned by accident.
//!
//! The bytes sit in their own heap allocation (a `Box`), so they never move when the owning
//! value moves (a moved stack array would leave copies behind), and that allocation is
//! `mlock`ed ([`crate::crypto::mlock`]) so it is never written to swap. Core dumps are disabled
//! by the daemon at start (`crate::hardening`).

use std::fmt;

use zeroize::Zeroize;

use super::mlock::{self, PageLock};

/// `N` secret bytes in a locked, zeroize-on-drop heap allocation.
pub struct Secret<const N: usize> {
    bytes: Box<[u8; N]>,
    /// Declared after `bytes`, so it is released after the bytes are zeroized and freed.
    lock: PageLock,
}

impl<const N: usize> Secret<N> {
    /// A secret of all zeros, to be filled in place (so the bytes are never on the stack).
    pub fn zeroed() -> Self {
        let bytes = Box::new([0u8; N]);
        let lock = mlock::lock(bytes.as_ptr(), N);
        Secret { bytes, lock }
    }

    /// Fresh random bytes from the system CSPRNG (AWS-LC's RAND_bytes).
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        use aws_lc_rs::rand::{SecureRandom, SystemRandom};
        let mut s = Self::zeroed();
        SystemRandom::new().fill(s.bytes.as_mut_slice())?;
        Ok(s)
    }

    /// Copies `src` into a new secret; `None` if the length is wrong. The caller remains
    /// responsible for zeroizing `src`.
    pub fn from_slice(src: &[u8]) -> Option<Self> {
        if src.len() != N {
            return None;
        }
        let mut s = Self::zeroed();
        s.bytes.copy_from_slice(src);
        Some(s)
    }

    pub fn expose(&self) -> &[u8; N] {
        &self.bytes
    }

    pub fn expose_mut(&mut self) -> &mut [u8; N] {
        &mut self.bytes
    }

    /// Whether the allocation is locked in memory (mlock succeeded).
    pub fn is_locked(&self) -> bool {
        self.lock.is_locked()
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        other.len() == N && aws_lc_rs::constant_time::verify_slices_are_equal(&self.bytes[..], other).is_ok()
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret { .. }")
    }
}

/// The 512-bit AES-256-XTS volume key (two 256-bit halves). Never written anywhere in
/// plaintext; `Debug` prints `VolumeKey { .. }`; not `Clone`.
pub struct VolumeKey(Secret<64>);

impl VolumeKey {
    pub const LEN: usize = 64;

    /// A fresh random key whose halves differ (XTS requires it; equal halves are
    /// astronomically unlikely but checked anyway).
    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        loop {
            let k = VolumeKey(Secret::random()?);
            if k.halves_differ() {
                return Ok(k);
            }
        }
    }

    /// Wraps bytes that came from a key provider; `None` if the length is wrong.
    pub fn from_slice(src: &[u8]) -> Option<Self> {
        Secret::from_slice(src).map(VolumeKey)
    }

    pub fn from_secret(s: Secret<64>) -> Self {
        VolumeKey(s)
    }

    pub fn expose(&self) -> &[u8; 64] {
        self.0.expose()
    }

    pub fn halves_differ(&self) -> bool {
        let k = self.0.expose();
        // Constant time is not needed for a yes/no on the key's own halves, but cheap.
        aws_lc_rs::constant_time::verify_slices_are_equal(&k[..32], &k[32..]).is_err()
    }

    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey { .. }")
    }
}

/// A 256-bit key-encryption key of the local provider.
pub struct Kek(Secret<32>);

impl Kek {
    pub const LEN: usize = 32;

    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        Secret::random().map(Kek)
    }

    pub fn from_slice(src: &[u8]) -> Option<Self> {
        Secret::from_slice(src).map(Kek)
    }

    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_bytes() {
        let k = VolumeKey::from_slice(&[0xAB; 64]).unwrap();
        assert_eq!(format!("{k:?}"), "VolumeKey { .. }");
        let kek = Kek::from_slice(&[0xCD; 32]).unwrap();
        assert_eq!(format!("{kek:?}"), "Kek { .. }");
    }

    #[test]
    fn generated_key_halves_differ() {
        let k = VolumeKey::generate().unwrap();
        assert!(k.halves_differ());
        let mut same = [7u8; 64];
        same[32..].copy_from_slice(&[7u8; 32]);
        assert!(!VolumeKey::from_slice(&same).unwrap().halves_differ());
    }

    #[test]
    fn wrong_length_is_refused() {
        assert!(VolumeKey::from_slice(&[1; 63]).is_none());
        assert!(Kek::from_slice(&[1; 33]).is_none());
    }

    #[test]
    fn secret_bytes_are_in_locked_memory() {
        let k = VolumeKey::generate().unwrap();
        assert!(k.is_locked(), "mlock refused (RLIMIT_MEMLOCK?)");
        assert!(mlock::kernel_says_locked(k.expose().as_ptr() as usize));
    }

    #[test]
    #[allow(unsafe_code)] // a look at the allocation's bytes just before it is freed
    fn drop_zeroizes_the_allocation() {
        // Zeroize in place (what Drop does first) and observe the same allocation: reading
        // freed memory would be UB, so the check runs on the live box just before release.
        let mut s = Secret::<64>::from_slice(&[0x5A; 64]).unwrap();
        let ptr = s.expose().as_ptr();
        s.bytes.zeroize();
        // SAFETY: `ptr` points into `s.bytes`, still alive here.
        let after = unsafe { std::slice::from_raw_parts(ptr, 64) };
        assert!(after.iter().all(|&b| b == 0));
    }
}
