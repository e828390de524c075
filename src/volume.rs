//! Opening a volume: read the header, unlock a key slot, check the key and the header MAC,
//! check the raw volume is large enough, and build the export.

use std::sync::Arc;

use crate::backend::{Backend, FileBackend};
use crate::crypto::{CipherError, SectorCipher, VolumeKey};
use crate::export::{Export, ExportOptions, Geometry};
use crate::header::{self, store, Header, HeaderError};
use crate::keys::{KeyError, KeyProvider};

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
}

impl VolumeError {
    /// Process exit code for this failure (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            VolumeError::NoUsableSlot(_) | VolumeError::KeyMismatch { .. } => 3,
            VolumeError::Header(_) | VolumeError::Tampered(_) | VolumeError::TooSmall { .. } => 4,
            VolumeError::Open { .. } | VolumeError::Cipher(_) => 1,
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

/// Opens the raw volume at `path` (with `direct`, bypassing the page cache).
pub fn open_backend(path: &std::path::Path, writable: bool, direct: bool) -> Result<Arc<dyn Backend>, VolumeError> {
    let b = FileBackend::open_with(path, writable, direct)
        .map_err(|source| VolumeError::Open { path: path.display().to_string(), source })?;
    Ok(Arc::new(b))
}

/// Tries the header's slots in order with every provider that owns them; the first that
/// unwraps a key matching the digest wins. A failed unwrap is reported, never cached.
pub async fn unlock(header: &Header, providers: &[Box<dyn KeyProvider>]) -> Result<(VolumeKey, u32), VolumeError> {
    let mut tried = Vec::new();
    for slot in &header.slots {
        let Some(p) = providers.iter().find(|p| p.owns(slot)) else {
            tried.push(format!("slot {}: no {} key {} given", slot.id, slot.provider, slot.key_id));
            continue;
        };
        match p.unwrap(slot).await {
            Ok(key) if header.key_matches(&key) => return Ok((key, slot.id)),
            Ok(_) => return Err(VolumeError::KeyMismatch { slot: slot.id }),
            Err(e) => tried.push(format!("slot {}: {}", slot.id, key_error_text(&e))),
        }
    }
    if header.slots.is_empty() {
        tried.push("the header has no key slots".into());
    }
    Err(VolumeError::NoUsableSlot(tried.join("; ")))
}

fn key_error_text(e: &KeyError) -> String {
    crate::server::error_chain(e)
}

/// Reads the header of `backend` and unlocks it.
pub async fn unlock_backend(
    backend: Arc<dyn Backend>,
    providers: &[Box<dyn KeyProvider>],
) -> Result<Unlocked, VolumeError> {
    let loaded = store::load(backend.as_ref())?;
    if loaded.is_degraded() {
        tracing::warn!(primary = ?loaded.primary, secondary = ?loaded.secondary, "header copy damaged or stale; opened from the valid copy (run `nbdcrypt header repair`)");
    }
    let (key, slot) = unlock(&loaded.header, providers).await?;
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
    let cipher = SectorCipher::new(&u.key, h.sector_size)?;
    drop(u.key);
    let geo = Geometry { sector_size: h.sector_size, data_offset: h.data_offset, data_size: h.data_size };
    Ok((Arc::new(Export::new(opts, geo, u.backend, cipher)), h))
}

/// Re-export for commands that only need the constant.
pub const DEFAULT_DATA_OFFSET: u64 = header::DEFAULT_DATA_OFFSET;
