//! Key providers: whatever wraps and unwraps the volume key.
//!
//! A volume's header holds one or more key slots, each a copy of the same volume key wrapped
//! by a provider (a local KEK file, or an AWS KMS key). Wrapping is always bound to an
//! encryption context that names the volume (its uuid at least), so a wrapped key copied into
//! another volume's header does not unwrap there.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::crypto::VolumeKey;
use crate::header::KeySlot;

pub mod local;

pub use local::LocalProvider;

/// The context key that binds a wrapped key to its volume.
pub const CONTEXT_VOLUME: &str = "nbdcrypt:volume";

/// Encryption context: string pairs, sorted (a BTreeMap), authenticated by the wrapping.
pub type EncryptionContext = BTreeMap<String, String>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key wrapped by a provider, ready to become a slot.
#[derive(Debug, Clone)]
pub struct Wrapped {
    /// Which key of the provider wrapped it (KEK fingerprint, KMS key ARN).
    pub key_id: String,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The slot belongs to another provider or another key of this one.
    #[error("slot is not for this key ({0})")]
    NotMine(String),
    /// Authentication of the wrapped key failed: wrong KEK, wrong context, or tampering.
    #[error("the wrapped key does not open with this key: wrong key, or the slot belongs to another volume")]
    UnwrapFailed,
    /// The unwrapped bytes are not a valid volume key.
    #[error("the unwrapped key is malformed ({0})")]
    Malformed(&'static str),
    /// A key file could not be read or written.
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// The random generator failed.
    #[error("random number generator failed")]
    Random,
    /// A provider-specific failure (KMS errors are typed by that provider).
    #[error("{0}")]
    Provider(String),
}

/// Something that can wrap a volume key and unwrap a slot.
pub trait KeyProvider: Send + Sync {
    /// Provider name as stored in the header (`local`, `aws-kms`).
    fn kind(&self) -> &'static str;

    /// A stable, non-secret identifier of the key doing the wrapping.
    fn key_id(&self) -> &str;

    /// Whether this provider is the one that wrapped `slot`.
    fn owns(&self, slot: &KeySlot) -> bool {
        slot.provider == self.kind() && slot.key_id == self.key_id()
    }

    /// Wraps `key` under `context`.
    fn wrap<'a>(
        &'a self,
        key: &'a VolumeKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Wrapped, KeyError>>;

    /// Unwraps a slot (with the context recorded in it).
    fn unwrap<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<VolumeKey, KeyError>>;

    /// A fresh volume key and its wrapped form. KMS overrides this with GenerateDataKey so the
    /// key is born inside KMS; the default generates locally and wraps.
    fn generate<'a>(&'a self, context: &'a EncryptionContext) -> BoxFuture<'a, Result<(VolumeKey, Wrapped), KeyError>> {
        Box::pin(async move {
            let key = VolumeKey::generate().map_err(|_| KeyError::Random)?;
            let wrapped = self.wrap(&key, context).await?;
            Ok((key, wrapped))
        })
    }
}

/// A provider named on the command line: `local:PATH` or `aws-kms:KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    Local(PathBuf),
    AwsKms(String),
}

impl std::str::FromStr for KeySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("local", p)) if !p.is_empty() => Ok(KeySpec::Local(PathBuf::from(p))),
            Some(("aws-kms", k)) if !k.is_empty() => Ok(KeySpec::AwsKms(k.to_owned())),
            _ => Err(format!("key must be local:KEKFILE or aws-kms:KEY (got {s:?})")),
        }
    }
}

/// The canonical byte encoding of a context, used as AEAD associated data: a label, then
/// each pair (sorted by key) as u32-BE length-prefixed key and value.
pub fn context_bytes(label: &[u8], ctx: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + ctx.len() * 64);
    out.extend_from_slice(label);
    for (k, v) in ctx {
        for part in [k.as_bytes(), v.as_bytes()] {
            // Context strings are bounded by the header parser (≤ 256 bytes), far below u32.
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_spec_parses_both_providers() {
        assert_eq!("local:/k".parse::<KeySpec>().unwrap(), KeySpec::Local("/k".into()));
        assert_eq!("aws-kms:alias/x".parse::<KeySpec>().unwrap(), KeySpec::AwsKms("alias/x".into()));
        assert!("foo:bar".parse::<KeySpec>().is_err());
        assert!("local:".parse::<KeySpec>().is_err());
    }

    #[test]
    fn context_encoding_is_unambiguous() {
        let a: EncryptionContext = [("ab".to_string(), "c".to_string())].into();
        let b: EncryptionContext = [("a".to_string(), "bc".to_string())].into();
        assert_ne!(context_bytes(b"x", &a), context_bytes(b"x", &b));
    }
}
