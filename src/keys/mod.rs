//! Key providers: whatever wraps and unwraps the volume key.
//!
//! A volume's header holds one or more key slots, each a copy of the same volume key wrapped
//! by a provider (a local KEK file, or an AWS KMS key). Wrapping is always bound to an
//! encryption context that names the volume (its uuid at least), so a wrapped key copied into
//! another volume's header does not unwrap there.
//!
//! - [`local`]: a 256-bit KEK file, AES-256-GCM.
//! - [`kms`]: AWS KMS (GenerateDataKey / Decrypt / ReEncrypt), with typed errors and a
//!   bounded retry loop.
//! - [`Keyring`]: what unlocking draws on: the KEK files given on the command line, plus KMS
//!   providers built on demand for each `aws-kms` slot (a slot records its key ARN, so no flag
//!   is needed to name it).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::path::PathBuf;
use std::pin::Pin;

use crate::crypto::VolumeKey;
use crate::header::KeySlot;

pub mod kms;
pub mod local;

pub use kms::{KmsError, KmsFactory, KmsOptions, KmsProvider};
pub use local::LocalProvider;

/// The context key that carries the header's binding (a cloud volume id), when it has one.
pub const CONTEXT_BINDING: &str = "nbdcrypt:binding";

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
    /// An AWS KMS failure.
    #[error(transparent)]
    Kms(#[from] KmsError),
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

/// Where unlocking finds the provider for a slot: a fixed list (tests, callers holding the
/// providers themselves) or a [`Keyring`] that also builds KMS providers on demand.
pub trait ProviderSource: Sync {
    /// The provider that can unwrap `slot`, `None` if there is none; an error if one should
    /// exist but cannot be built (e.g. no AWS region).
    fn provider_for<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<Option<ProviderRef<'a>>, KeyError>>;
}

/// A provider either borrowed from the source or built for one slot.
pub enum ProviderRef<'a> {
    Borrowed(&'a (dyn KeyProvider + 'static)),
    Owned(Box<dyn KeyProvider>),
}

impl Deref for ProviderRef<'_> {
    type Target = dyn KeyProvider;

    fn deref(&self) -> &Self::Target {
        match self {
            ProviderRef::Borrowed(p) => *p,
            ProviderRef::Owned(p) => p.as_ref(),
        }
    }
}

impl fmt::Debug for ProviderRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProviderRef({} {})", self.kind(), self.key_id())
    }
}

impl ProviderSource for [Box<dyn KeyProvider>] {
    fn provider_for<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<Option<ProviderRef<'a>>, KeyError>> {
        let found = self.iter().find(|p| p.owns(slot)).map(|p| ProviderRef::Borrowed(p.as_ref()));
        Box::pin(std::future::ready(Ok(found)))
    }
}

impl ProviderSource for Vec<Box<dyn KeyProvider>> {
    fn provider_for<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<Option<ProviderRef<'a>>, KeyError>> {
        self.as_slice().provider_for(slot)
    }
}

/// The keys a command may use: explicit providers (local KEK files) and, unless disabled,
/// KMS providers built on demand from each `aws-kms` slot's key ARN.
#[derive(Default)]
pub struct Keyring {
    providers: Vec<Box<dyn KeyProvider>>,
    kms: Option<KmsFactory>,
}

impl Keyring {
    /// Local KEK files, plus KMS with `kms` options.
    pub fn new(kek_files: &[PathBuf], kms: KmsOptions) -> Result<Keyring, KeyError> {
        let mut k = Keyring { providers: Vec::new(), kms: Some(KmsFactory::new(kms)) };
        for path in kek_files {
            k.add(Box::new(LocalProvider::load(path)?));
        }
        Ok(k)
    }

    /// Only these providers; no KMS.
    pub fn with_providers(providers: Vec<Box<dyn KeyProvider>>) -> Keyring {
        Keyring { providers, kms: None }
    }

    pub fn add(&mut self, p: Box<dyn KeyProvider>) {
        self.providers.push(p);
    }

    /// The KMS factory, if KMS is enabled.
    pub fn kms(&self) -> Option<&KmsFactory> {
        self.kms.as_ref()
    }

    /// A provider for a `--key` spec: loads a KEK file, or prepares a KMS key.
    pub async fn provider_for_spec(&self, spec: &KeySpec) -> Result<Box<dyn KeyProvider>, KeyError> {
        match spec {
            KeySpec::Local(path) => Ok(Box::new(LocalProvider::load(path)?)),
            KeySpec::AwsKms(key) => match &self.kms {
                Some(f) => Ok(Box::new(f.provider(key).await?)),
                None => Err(KeyError::Provider("AWS KMS is not enabled here".into())),
            },
        }
    }
}

impl ProviderSource for Keyring {
    fn provider_for<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<Option<ProviderRef<'a>>, KeyError>> {
        Box::pin(async move {
            if let Some(p) = self.providers.iter().find(|p| p.owns(slot)) {
                return Ok(Some(ProviderRef::Borrowed(p.as_ref())));
            }
            match &self.kms {
                Some(f) if slot.provider == kms::KIND => {
                    Ok(Some(ProviderRef::Owned(Box::new(f.provider(&slot.key_id).await?))))
                }
                _ => Ok(None),
            }
        })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.providers.iter().map(|p| format!("{} {}", p.kind(), p.key_id())).collect();
        f.debug_struct("Keyring").field("providers", &ids).field("kms", &self.kms.is_some()).finish()
    }
}

/// The encryption context of a new slot of volume `uuid`: the volume, the binding if the
/// header has one, and the operator's extra pairs (which may not use the reserved keys).
pub fn slot_context(
    uuid: &uuid::Uuid,
    binding: Option<&str>,
    extra: &[(String, String)],
) -> Result<EncryptionContext, String> {
    let mut ctx = EncryptionContext::new();
    for (k, v) in extra {
        if k == CONTEXT_VOLUME || k == CONTEXT_BINDING {
            return Err(format!("context key {k} is reserved"));
        }
        ctx.insert(k.clone(), v.clone());
    }
    ctx.insert(CONTEXT_VOLUME.into(), uuid.to_string());
    if let Some(b) = binding {
        ctx.insert(CONTEXT_BINDING.into(), b.to_owned());
    }
    Ok(ctx)
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

    #[test]
    fn slot_context_names_the_volume_and_binding_and_reserves_them() {
        let uuid = uuid::Uuid::nil();
        let ctx = slot_context(&uuid, Some("vol-1"), &[("app".into(), "db".into())]).unwrap();
        assert_eq!(ctx.get(CONTEXT_VOLUME).map(String::as_str), Some("00000000-0000-0000-0000-000000000000"));
        assert_eq!(ctx.get(CONTEXT_BINDING).map(String::as_str), Some("vol-1"));
        assert_eq!(ctx.get("app").map(String::as_str), Some("db"));
        assert!(slot_context(&uuid, None, &[(CONTEXT_VOLUME.into(), "x".into())]).is_err());
        assert!(slot_context(&uuid, None, &[(CONTEXT_BINDING.into(), "x".into())]).is_err());
    }
}
