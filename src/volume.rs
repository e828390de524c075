//! Opening a volume: read the header, unlock a key slot, check the key and the header MAC,
//! check the raw volume is large enough, and build the export.

use std::sync::Arc;

use crate::backend::{Backend, Caching, FileBackend};
use crate::crypto::{CipherError, SectorCipher, VolumeKey};
use crate::export::{Export, ExportOptions, Geometry};
use crate::header::{self, store, Header, HeaderError, KeySlot};
use crate::keys::{KeyError, ProviderSource};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("header")]
    Header(#[from] HeaderError),
    #[error("no key slot could be unlocked ({0})")]
    NoUsableSlot(String),
    #[error("slot {slot} unwrapped a key that does not match this volume's key digest")]
    KeyMismatch { slot: u32 },
    #[error("the header's MAC does not verify with the volume key: the header was tampered with")]
    Tampered(#[source] HeaderError),
    #[error("the raw volume is {actual} bytes but the header describes {needed} bytes")]
    TooSmall { actual: u64, needed: u64 },
    #[error("cannot set up the sector cipher")]
    Cipher(#[from] CipherError),
    /// The header records an unfinished migrate/encrypt/reencrypt/decrypt: its data area is
    /// not all under the header's key yet.
    #[error(
        "an unfinished `{kind}` is recorded on this volume: run `nbdcrypt {kind}` again to finish it before serving"
    )]
    Busy { kind: String },
    /// Another process holds the device (an offline operation, or another server).
    #[error("{path} is in use by another nbdcrypt process (serve or an offline operation)")]
    Locked { path: String },
    /// The header is bound to another cloud volume than the device (`--strict-binding`).
    #[error(
        "the header is bound to volume {bound} but the device is {actual}: it was copied or cloned from \
         another volume (refused by --strict-binding)"
    )]
    BindingMismatch { bound: String, actual: String },
    /// The header is bound to a cloud volume but the device's identity is unknown
    /// (`--strict-binding`).
    #[error(
        "the header is bound to volume {bound} but the device's volume id cannot be determined (give it with \
         --device-id; refused by --strict-binding)"
    )]
    BindingUnknown { bound: String },
}

impl VolumeError {
    /// Process exit code for this failure (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            VolumeError::NoUsableSlot(_) | VolumeError::KeyMismatch { .. } => 3,
            VolumeError::Header(_)
            | VolumeError::Tampered(_)
            | VolumeError::TooSmall { .. }
            | VolumeError::BindingMismatch { .. }
            | VolumeError::BindingUnknown { .. } => 4,
            VolumeError::Open { .. }
            | VolumeError::Cipher(_)
            | VolumeError::Busy { .. }
            | VolumeError::Locked { .. } => 1,
        }
    }
}

/// An unlocked volume: the key, its header, and the slot that opened it.
#[derive(Debug)]
pub struct Unlocked {
    pub backend: Arc<dyn Backend>,
    pub loaded: store::Loaded,
    pub key: VolumeKey,
    pub slot: u32,
}

impl Unlocked {
    pub fn header(&self) -> &Header {
        &self.loaded.header
    }
}

/// Opens the raw volume at `path`, buffered, for a command that reads or changes only the
/// header (`inspect`, `keyslot`, `rewrap`): no "in use" lock, so key slots can be added,
/// removed or rewrapped while the volume is served (the header-changing commands serialise
/// on an exclusive `flock` instead, which the offline operations take too).
pub fn open_backend(path: &std::path::Path, writable: bool) -> Result<Arc<dyn Backend>, VolumeError> {
    let b = FileBackend::open(path, writable)
        .map_err(|source| VolumeError::Open { path: path.display().to_string(), source })?;
    Ok(Arc::new(b))
}

/// Opens the raw volume at `path` for serving, with the data path's `caching`. Takes a
/// non-blocking `fcntl` record lock (exclusive when writable, shared otherwise), held as long
/// as the process keeps the file: the offline operations of [`crate::migrate`] take it
/// exclusively, so they and `serve` refuse each other, as do two writable daemons
/// ([`FileBackend::try_lock`]).
pub fn open_backend_for_serving(
    path: &std::path::Path,
    writable: bool,
    caching: Caching,
) -> Result<Arc<dyn Backend>, VolumeError> {
    let b = FileBackend::open_with(path, writable, caching)
        .map_err(|source| VolumeError::Open { path: path.display().to_string(), source })?;
    if !b.try_lock(writable) {
        return Err(VolumeError::Locked { path: path.display().to_string() });
    }
    Ok(Arc::new(b))
}

/// Tries the header's slots in order with the provider the source has for each; the first
/// that unwraps a key matching the digest wins. A failed unwrap is reported, never cached.
pub async fn unlock<S: ProviderSource + ?Sized>(header: &Header, source: &S) -> Result<(VolumeKey, u32), VolumeError> {
    unlock_where(header, source, |_| true).await
}

/// [`unlock`] through the slots `usable` accepts only (e.g. every slot but the one being
/// removed, to prove the volume stays reachable without it).
pub async fn unlock_where<S: ProviderSource + ?Sized>(
    header: &Header,
    source: &S,
    usable: impl Fn(&KeySlot) -> bool,
) -> Result<(VolumeKey, u32), VolumeError> {
    let mut tried = Vec::new();
    for slot in header.slots.iter().filter(|s| usable(s)) {
        let p = match source.provider_for(slot).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                tried.push(format!("slot {}: no {} key {} given", slot.id, slot.provider, slot.key_id));
                continue;
            }
            Err(e) => {
                tracing::warn!(slot = slot.id, provider = %slot.provider, error = %key_error_text(&e), "key slot unavailable");
                tried.push(format!("slot {}: {}", slot.id, key_error_text(&e)));
                continue;
            }
        };
        let started = std::time::Instant::now();
        match p.unwrap(slot).await {
            Ok(key) if header.key_matches(&key) => {
                tracing::info!(
                    slot = slot.id, provider = %slot.provider, key_id = %slot.key_id,
                    unwrap_ms = started.elapsed().as_millis() as u64, "key slot opened the volume"
                );
                return Ok((key, slot.id));
            }
            Ok(_) => return Err(VolumeError::KeyMismatch { slot: slot.id }),
            Err(e) => {
                tracing::warn!(slot = slot.id, provider = %slot.provider, key_id = %slot.key_id, error = %key_error_text(&e), "key slot did not open");
                tried.push(format!("slot {}: {}", slot.id, key_error_text(&e)));
            }
        }
    }
    if tried.is_empty() {
        tried.push("no key slot to try".into());
    }
    Err(VolumeError::NoUsableSlot(tried.join("; ")))
}

/// Checks the header's binding (a cloud volume id recorded at format) against the identity
/// of the device it is read from. A mismatch means the header (or the whole volume) was
/// copied: warn, or with `strict` refuse. Without a binding there is nothing to check.
pub fn check_binding(header: &Header, device_id: Option<&str>, strict: bool) -> Result<(), VolumeError> {
    let Some(b) = &header.binding else {
        return Ok(());
    };
    match device_id {
        Some(actual) if crate::identity::same_volume(&b.volume_id, actual) => Ok(()),
        Some(actual) if strict => {
            Err(VolumeError::BindingMismatch { bound: b.volume_id.clone(), actual: actual.to_owned() })
        }
        Some(actual) => {
            tracing::warn!(bound = %b.volume_id, device = %actual, "the header is bound to another volume than this device: it was copied or cloned (--strict-binding refuses this)");
            Ok(())
        }
        None if strict => Err(VolumeError::BindingUnknown { bound: b.volume_id.clone() }),
        None => {
            tracing::warn!(bound = %b.volume_id, "the header is bound to a volume but this device's volume id is unknown; binding not checked (give --device-id)");
            Ok(())
        }
    }
}

fn key_error_text(e: &KeyError) -> String {
    crate::logging::error_chain(e)
}

/// Reads the header of `backend` and unlocks it.
pub async fn unlock_backend<S: ProviderSource + ?Sized>(
    backend: Arc<dyn Backend>,
    source: &S,
) -> Result<Unlocked, VolumeError> {
    unlock_backend_checked(backend, source, |_| Ok(())).await
}

/// [`unlock_backend`], running `precheck` on the header before any key provider is asked
/// (so that a refused binding never reaches KMS).
pub async fn unlock_backend_checked<S: ProviderSource + ?Sized>(
    backend: Arc<dyn Backend>,
    source: &S,
    precheck: impl FnOnce(&Header) -> Result<(), VolumeError>,
) -> Result<Unlocked, VolumeError> {
    let loaded = store::load(backend.as_ref())?;
    if loaded.is_degraded() {
        tracing::warn!(primary = ?loaded.primary, secondary = ?loaded.secondary, "header copy damaged or stale; opened from the valid copy (run `nbdcrypt header repair`)");
    }
    precheck(&loaded.header)?;
    let (key, slot) = unlock(&loaded.header, source).await?;
    loaded.header.verify_mac(&key).map_err(VolumeError::Tampered)?;
    let h = &loaded.header;
    let needed = h
        .data_offset
        .checked_add(h.data_size)
        .ok_or(HeaderError::Field { field: "data_size".into(), reason: "data_offset + data_size overflows".into() })?;
    if backend.size() < needed {
        return Err(VolumeError::TooSmall { actual: backend.size(), needed });
    }
    Ok(Unlocked { backend, loaded, key, slot })
}

/// Builds the export of an unlocked volume. The key moves into the cipher's contexts and is
/// dropped (zeroized) here.
pub fn into_export(u: Unlocked, opts: ExportOptions) -> Result<(Arc<Export>, Header), VolumeError> {
    let h = u.loaded.header;
    if let Some(c) = &h.checkpoint {
        return Err(VolumeError::Busy { kind: c.kind.clone() });
    }
    let cipher = SectorCipher::new(&u.key, h.sector_size)?.with_zero_sectors(h.zero_sectors);
    drop(u.key);
    let geo = Geometry { sector_size: h.sector_size, data_offset: h.data_offset, data_size: h.data_size };
    Ok((Arc::new(Export::new(opts, geo, u.backend, cipher)), h))
}

/// Re-export for commands that only need the constant.
pub const DEFAULT_DATA_OFFSET: u64 = header::DEFAULT_DATA_OFFSET;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::crypto::Kek;
    use crate::header::{Binding, KeySlot};
    use crate::keys::{kms, KeyProvider, Keyring, LocalProvider};
    use crate::units::SectorSize;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    fn local() -> LocalProvider {
        LocalProvider::from_kek(Kek::generate().unwrap(), Path::new("/test.kek"))
    }

    /// A header with one slot per provider, all wrapping the same key.
    fn header_with(providers: &[&dyn KeyProvider], binding: Option<&str>) -> (Header, VolumeKey) {
        let key = VolumeKey::generate().unwrap();
        let uuid = uuid::Uuid::new_v4();
        let binding = binding.map(|b| Binding { volume_id: b.into() });
        let mut h = Header::new(uuid, SectorSize::S4096, DEFAULT_DATA_OFFSET, 1 << 20, binding, &key).unwrap();
        for (id, p) in providers.iter().enumerate() {
            let ctx = crate::keys::slot_context(&uuid, None, &[]).unwrap();
            let w = block_on(p.wrap(&key, &ctx)).unwrap();
            h.slots.push(KeySlot {
                id: id as u32,
                provider: p.kind().into(),
                key_id: w.key_id,
                wrapped: w.ciphertext,
                context: ctx,
                created: 0,
            });
        }
        (h, key)
    }

    #[test]
    fn unlock_uses_the_first_slot_a_provider_opens() {
        let (a, b) = (local(), local());
        let (h, key) = header_with(&[&a, &b], None);
        let ring = Keyring::with_providers(vec![Box::new(local()), Box::new(b)]);
        let (got, slot) = block_on(unlock(&h, &ring)).unwrap();
        assert_eq!((got.expose(), slot), (key.expose(), 1));
    }

    #[test]
    fn unlock_where_skips_excluded_slots() {
        let a = local();
        let (h, _) = header_with(&[&a], None);
        let ring = Keyring::with_providers(vec![Box::new(a)]);
        let err = block_on(unlock_where(&h, &ring, |s| s.id != 0)).unwrap_err();
        assert!(matches!(err, VolumeError::NoUsableSlot(_)), "{err}");
    }

    #[test]
    fn a_kms_slot_without_kms_is_reported_not_fatal() {
        let a = local();
        let (mut h, key) = header_with(&[&a], None);
        let mut kms_slot = h.slots[0].clone();
        kms_slot.id = 5;
        kms_slot.provider = kms::KIND.into();
        kms_slot.key_id = "arn:aws:kms:eu-west-1:111122223333:key/x".into();
        h.slots.insert(0, kms_slot);
        let ring = Keyring::with_providers(vec![Box::new(a)]);
        let (got, slot) = block_on(unlock(&h, &ring)).unwrap();
        assert_eq!((got.expose(), slot), (key.expose(), 0));
    }

    #[test]
    fn a_plain_provider_list_still_works() {
        let a = local();
        let (h, _) = header_with(&[&a], None);
        let providers: Vec<Box<dyn KeyProvider>> = vec![Box::new(a)];
        assert_eq!(block_on(unlock(&h, &providers)).unwrap().1, 0);
    }

    #[test]
    fn binding_check_warns_or_refuses() {
        let (h, _) = header_with(&[], Some("vol-0abc"));
        assert!(check_binding(&h, Some("vol0ABC"), true).is_ok());
        assert!(check_binding(&h, Some("vol-0def"), false).is_ok());
        assert!(matches!(check_binding(&h, Some("vol-0def"), true), Err(VolumeError::BindingMismatch { .. })));
        assert!(check_binding(&h, None, false).is_ok());
        assert!(matches!(check_binding(&h, None, true), Err(VolumeError::BindingUnknown { .. })));
        let (unbound, _) = header_with(&[], None);
        assert!(check_binding(&unbound, Some("vol-0def"), true).is_ok());
        assert_eq!(VolumeError::BindingUnknown { bound: "x".into() }.exit_code(), 4);
    }
}
