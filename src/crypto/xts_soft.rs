//! A second, independent AES-256-XTS (IEEE 1619) on RustCrypto's `aes`, used only by the unit
//! tests of [`super::xts`] to cross-check the AWS-LC wrapper.
//!
//! It follows the standard directly: `T = E_K2(tweak)`, then for block `j` of the data unit
//! `C_j = E_K1(P_j ^ T·α^j) ^ T·α^j`, with `α` the generator of GF(2^128) under the
//! polynomial x^128 + x^7 + x^2 + x + 1 and the 16-byte block read as a little-endian integer.
//! Sectors are whole multiples of 16 bytes, so ciphertext stealing is not implemented.
//!
//! The blocks of a sector are XOR-ed with their tweaks, then sent through `encrypt_blocks` in
//! one batch (which lets `aes` use its pipelined AES-NI path), then XOR-ed again.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

use crate::units::SectorIndex;

/// AES block size in bytes.
const BLOCK: usize = 16;

/// Pure-Rust AES-256-XTS over whole data units (sectors).
pub(crate) struct SoftXts {
    /// Data key (first half of the XTS key).
    k1: Aes256,
    /// Tweak key (second half).
    k2: Aes256,
}

impl SoftXts {
    /// `key` is Key1 || Key2. Unlike the production cipher this does not refuse equal
    /// halves: it exists to compute reference values, not to protect data.
    pub(crate) fn new(key: &[u8; 64]) -> Self {
        SoftXts { k1: Aes256::new(key[..32].into()), k2: Aes256::new(key[32..].into()) }
    }

    /// Encrypts consecutive data units of `unit` bytes; unit `i` uses tweak `first + i`.
    pub(crate) fn encrypt(&self, first: SectorIndex, unit: usize, buf: &mut [u8]) {
        self.run(first, unit, buf, true);
    }

    /// Decrypts consecutive data units of `unit` bytes; unit `i` uses tweak `first + i`.
    pub(crate) fn decrypt(&self, first: SectorIndex, unit: usize, buf: &mut [u8]) {
        self.run(first, unit, buf, false);
    }

    fn run(&self, first: SectorIndex, unit: usize, buf: &mut [u8], encrypt: bool) {
        assert!(unit.is_multiple_of(BLOCK) && unit > 0, "data unit must be a positive multiple of 16");
        assert!(buf.len().is_multiple_of(unit), "buffer must hold whole data units");
        let mut blocks = vec![Block::default(); unit / BLOCK];
        let mut tweaks = vec![0u128; unit / BLOCK];
        for (i, sector) in buf.chunks_exact_mut(unit).enumerate() {
            let index = first.0 + i as u64;
            self.unit_tweaks(SectorIndex(index).tweak(), &mut tweaks);
            for ((b, p), t) in blocks.iter_mut().zip(sector.chunks_exact(BLOCK)).zip(&tweaks) {
                xor_into(b, p, *t);
            }
            if encrypt {
                self.k1.encrypt_blocks(&mut blocks);
            } else {
                self.k1.decrypt_blocks(&mut blocks);
            }
            for ((b, out), t) in blocks.iter().zip(sector.chunks_exact_mut(BLOCK)).zip(&tweaks) {
                xor_into_slice(out, b, *t);
            }
        }
    }

    /// Fills `out[j]` with `E_K2(tweak)·α^j`, as little-endian 128-bit integers.
    fn unit_tweaks(&self, tweak: [u8; 16], out: &mut [u128]) {
        let mut t = Block::from(tweak);
        self.k2.encrypt_block(&mut t);
        let mut x = u128::from_le_bytes(t.into());
        for slot in out.iter_mut() {
            *slot = x;
            x = mul_alpha(x);
        }
    }
}

/// Multiplication by α (x) in GF(2^128) mod x^128 + x^7 + x^2 + x + 1.
fn mul_alpha(x: u128) -> u128 {
    let carry = x >> 127;
    (x << 1) ^ (carry * 0x87)
}

/// `dst = src ^ t` (t as little-endian bytes).
fn xor_into(dst: &mut Block, src: &[u8], t: u128) {
    let t = t.to_le_bytes();
    for ((d, s), k) in dst.iter_mut().zip(src).zip(t) {
        *d = s ^ k;
    }
}

/// `dst = src ^ t` (t as little-endian bytes).
fn xor_into_slice(dst: &mut [u8], src: &Block, t: u128) {
    let t = t.to_le_bytes();
    for ((d, s), k) in dst.iter_mut().zip(src.iter()).zip(t) {
        *d = s ^ k;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn mul_alpha_reduces_the_carry() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1u128 << 127), 0x87);
    }

    #[test]
    fn decrypt_inverts_encrypt() {
        let mut key = [0u8; 64];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8;
        }
        let x = SoftXts::new(&key);
        let plain: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        let mut buf = plain.clone();
        x.encrypt(SectorIndex(9), 512, &mut buf);
        assert_ne!(buf, plain);
        x.decrypt(SectorIndex(9), 512, &mut buf);
        assert_eq!(buf, plain);
    }
}
