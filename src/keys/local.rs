//! The local key provider: a 256-bit key-encryption key (KEK) in a file, wrapping the volume
//! key with AES-256-GCM whose associated data is the slot's encryption context.
//!
//! Wrapped form: `nonce (12) || ciphertext (64) || tag (16)`. The KEK is identified in the
//! header by a fingerprint (`kek:` + 16 hex digits of HMAC-SHA256(KEK, label)), which names
//! the right file without revealing anything about the key.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroize;

use super::{context_bytes, BoxFuture, EncryptionContext, KeyError, KeyProvider, Wrapped};
use crate::crypto::{kdf, Kek, Secret, VolumeKey};
use crate::header::KeySlot;

pub const KIND: &str = "local";
const AAD_LABEL: &[u8] = b"nbdcrypt v1 local wrap\0";
const ID_LABEL: &[u8] = b"nbdcrypt v1 kek id";
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = NONCE_LEN + VolumeKey::LEN + TAG_LEN;

#[derive(Debug)]
pub struct LocalProvider {
    kek: Kek,
    key_id: String,
    path: PathBuf,
}

impl LocalProvider {
    /// Loads a KEK file: exactly 32 raw bytes, or 64 hex digits (optionally newline-ended).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError::KeyFile { path: path.to_owned(), reason };
        let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let meta = f.metadata().map_err(|e| err(e.to_string()))?;
        if meta.len() > 256 {
            return Err(err(format!("is {} bytes; a KEK file holds 32 bytes", meta.len())));
        }
        let mut raw = Secret::<256>::zeroed();
        let mut n = 0;
        loop {
            let r = f.read(&mut raw.expose_mut()[n..]).map_err(|e| err(e.to_string()))?;
            if r == 0 || n + r == 256 {
                n += r;
                break;
            }
            n += r;
        }
        let bytes = &raw.expose()[..n];
        let kek = if n == Kek::LEN {
            Kek::from_slice(bytes)
        } else {
            let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
            let mut decoded = [0u8; 32];
            let ok = text.len() == 64 && hex::decode_to_slice(text, &mut decoded).is_ok();
            let k = if ok { Kek::from_slice(&decoded) } else { None };
            decoded.zeroize();
            k
        }
        .ok_or_else(|| err("is not a KEK (32 raw bytes or 64 hex digits)".into()))?;
        Ok(Self::from_kek(kek, path))
    }

    pub fn from_kek(kek: Kek, path: &Path) -> Self {
        let id_key = Secret::<32>::from_slice(kek.expose()).unwrap_or_else(Secret::zeroed);
        let fp = kdf::mac(&id_key, &[ID_LABEL]);
        let key_id = format!("kek:{}", hex::encode(&fp[..8]));
        LocalProvider { kek, key_id, path: path.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aead(&self) -> Result<LessSafeKey, KeyError> {
        UnboundKey::new(&AES_256_GCM, self.kek.expose())
            .map(LessSafeKey::new)
            .map_err(|_| KeyError::Provider("AES-GCM key setup failed".into()))
    }
}

impl KeyProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn wrap<'a>(
        &'a self,
        key: &'a VolumeKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Wrapped, KeyError>> {
        Box::pin(async move {
            let mut nonce = [0u8; NONCE_LEN];
            SystemRandom::new().fill(&mut nonce).map_err(|_| KeyError::Random)?;
            let mut out = Vec::with_capacity(WRAPPED_LEN);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(key.expose());
            let aad = context_bytes(AAD_LABEL, context);
            let sealed = self.aead()?.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[NONCE_LEN..],
            );
            match sealed {
                Ok(tag) => out.extend_from_slice(tag.as_ref()),
                Err(_) => {
                    out.zeroize();
                    return Err(KeyError::Provider("AES-GCM seal failed".into()));
                }
            }
            Ok(Wrapped { key_id: self.key_id.clone(), ciphertext: out })
        })
    }

    fn unwrap<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<VolumeKey, KeyError>> {
        Box::pin(async move {
            if slot.provider != KIND {
                return Err(KeyError::NotMine(format!("provider {}", slot.provider)));
            }
            if slot.wrapped.len() != WRAPPED_LEN {
                return Err(KeyError::Malformed("wrapped key has the wrong length"));
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&slot.wrapped[..NONCE_LEN]);
            // Decrypt inside a locked secret buffer so the plaintext never sits in a plain Vec.
            let mut buf = Secret::<{ VolumeKey::LEN + TAG_LEN }>::zeroed();
            buf.expose_mut().copy_from_slice(&slot.wrapped[NONCE_LEN..]);
            let aad = context_bytes(AAD_LABEL, &slot.context);
            let plain = self
                .aead()?
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), buf.expose_mut())
                .map_err(|_| KeyError::UnwrapFailed)?;
            let key = VolumeKey::from_slice(plain).ok_or(KeyError::Malformed("unwrapped key has the wrong length"))?;
            if !key.halves_differ() {
                return Err(KeyError::Malformed("the two XTS key halves are equal"));
            }
            Ok(key)
        })
    }
}

/// Writes a new random KEK to `path` (mode 0600), refusing to overwrite an existing file.
pub fn generate_kek_file(path: &Path) -> Result<LocalProvider, KeyError> {
    let err = |reason: String| KeyError::KeyFile { path: path.to_owned(), reason };
    let kek = Kek::generate().map_err(|_| KeyError::Random)?;
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            err("already exists; refusing to overwrite a key".into())
        } else {
            err(e.to_string())
        }
    })?;
    f.write_all(kek.expose()).and_then(|_| f.sync_all()).map_err(|e| err(e.to_string()))?;
    Ok(LocalProvider::from_kek(kek, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn slot(p: &LocalProvider, w: Wrapped, ctx: EncryptionContext) -> KeySlot {
        KeySlot { id: 0, provider: p.kind().into(), key_id: w.key_id, wrapped: w.ciphertext, context: ctx, created: 0 }
    }

    fn ctx(uuid: &str) -> EncryptionContext {
        BTreeMap::from([(super::super::CONTEXT_VOLUME.to_string(), uuid.to_string())])
    }

    fn provider() -> LocalProvider {
        LocalProvider::from_kek(Kek::generate().unwrap(), Path::new("/test"))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn wrap_unwrap_round_trip() {
        let p = provider();
        let key = VolumeKey::generate().unwrap();
        let w = block_on(p.wrap(&key, &ctx("a"))).unwrap();
        assert!(!w.ciphertext.windows(16).any(|win| key.expose().windows(16).any(|k| k == win)));
        let back = block_on(p.unwrap(&slot(&p, w, ctx("a")))).unwrap();
        assert_eq!(back.expose(), key.expose());
    }

    #[test]
    fn other_context_does_not_unwrap() {
        let p = provider();
        let key = VolumeKey::generate().unwrap();
        let w = block_on(p.wrap(&key, &ctx("a"))).unwrap();
        assert!(matches!(block_on(p.unwrap(&slot(&p, w, ctx("b")))), Err(KeyError::UnwrapFailed)));
    }

    #[test]
    fn other_kek_does_not_unwrap() {
        let (p, q) = (provider(), provider());
        assert_ne!(p.key_id(), q.key_id());
        let key = VolumeKey::generate().unwrap();
        let w = block_on(p.wrap(&key, &ctx("a"))).unwrap();
        assert!(matches!(block_on(q.unwrap(&slot(&p, w, ctx("a")))), Err(KeyError::UnwrapFailed)));
    }

    #[test]
    fn kek_file_is_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let p = generate_kek_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(generate_kek_file(&path).is_err());
        assert_eq!(LocalProvider::load(&path).unwrap().key_id(), p.key_id());
    }

    #[test]
    fn malformed_kek_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, b"short").unwrap();
        assert!(LocalProvider::load(&path).is_err());
    }
}
