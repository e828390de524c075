//! Sub-keys and digests derived from the volume key.
//!
//! The volume key itself is only ever used as the XTS key. Everything else that needs a key
//! derived from it (the header MAC, the key-check digest) goes through HKDF-SHA256 with a
//! distinct `info` label, so no two uses share key material.

use aws_lc_rs::{hkdf, hmac};

use super::secret::{Secret, VolumeKey};

/// HKDF `info` labels; changing one changes the on-disk format.
pub const LABEL_HEADER_MAC: &[u8] = b"nbdcrypt v1 header mac";
pub const LABEL_KEY_DIGEST: &[u8] = b"nbdcrypt v1 key digest";

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// HKDF-SHA256(salt, volume key) expanded with `label` into a 32-byte secret.
pub fn derive(key: &VolumeKey, salt: &[u8], label: &[u8]) -> Secret<32> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.expose());
    let mut out = Secret::<32>::zeroed();
    // The output length (32) is far below HKDF-SHA256's 255*32 limit, so expand/fill cannot
    // fail; on the impossible error the secret stays zero and every MAC check fails closed.
    let labels = [label];
    if let Ok(okm) = prk.expand(&labels, Len32) {
        let _ = okm.fill(out.expose_mut());
    }
    out
}

/// HMAC-SHA256 of `parts` (concatenated) under a derived sub-key.
pub fn mac(subkey: &Secret<32>, parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, subkey.expose());
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_give_independent_subkeys() {
        let k = VolumeKey::from_slice(&[3u8; 64]).unwrap();
        let a = derive(&k, b"salt", LABEL_HEADER_MAC);
        let b = derive(&k, b"salt", LABEL_KEY_DIGEST);
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose(), &[0u8; 32]);
    }

    #[test]
    fn mac_depends_on_every_part() {
        let k = Secret::<32>::from_slice(&[9u8; 32]).unwrap();
        assert_ne!(mac(&k, &[b"ab", b"c"]), mac(&k, &[b"ab", b"d"]));
        assert!(mac_eq(&mac(&k, &[b"x"]), &mac(&k, &[b"x"])));
    }
}
