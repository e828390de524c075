//! Volume migration and re-encryption (issue 6): copying a plaintext volume into a new
//! encrypted one, and the in-place operations that encrypt a plaintext volume, re-encrypt it
//! under a new volume key, or decrypt it back, all resumable after Ctrl-C, `kill -9` or a power
//! cut. The design and its crash-safety argument are in `docs/reencryption.md`.
//!
//! - [`copy`]: `nbdcrypt migrate`: SRC to a freshly formatted target, progress checkpointed
//!   in the target header (`reencrypt` checkpoint of kind `migrate`), optional verify pass.
//! - [`inplace`]: the engine of `encrypt` / `decrypt` / `reencrypt` (datashift or in-place
//!   with backups), synchronous, on a [`crate::backend::Backend`].
//! - [`journal`]: the 3 MiB journal area at the end of the volume those operations keep.
//! - [`source`]: what a migration reads (file, block device, NBD export via a small client).
//! - [`progress`]: the progress bar / log lines.
//! - [`fault`]: fault injection for the crash tests.

use std::fs::File;
use std::path::Path;

use crate::crypto::kdf::{derive, mac, mac_eq};
use crate::crypto::{CipherError, VolumeKey};
use crate::header::{Checkpoint, Header, HeaderError};

pub mod copy;
pub mod fault;
pub mod inplace;
pub mod journal;
pub mod progress;
pub mod source;

/// HKDF label of the checkpoint MAC key; changing it changes the on-disk format.
pub const LABEL_CHECKPOINT_MAC: &[u8] = b"nbdcrypt v1 checkpoint mac";

/// Failures of a migration or an in-place operation.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Reading, writing or flushing failed; `what` says which.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("sector cipher")]
    Cipher(#[from] CipherError),
    /// A precondition does not hold (sizes, geometry, a journal that does not fit).
    #[error("{0}")]
    Invalid(String),
    /// The operation would destroy data or is not this device's to resume.
    #[error("refusing: {0}")]
    Refused(String),
    /// `--verify` found a difference.
    #[error("verification failed: {0}")]
    Mismatch(String),
}

impl MigrateError {
    pub fn io(what: impl Into<String>) -> impl Fn(std::io::Error) -> MigrateError {
        let what = what.into();
        move |source| MigrateError::Io { what: what.clone(), source }
    }

    /// Process exit code (see the README's table).
    pub fn exit_code(&self) -> i32 {
        match self {
            MigrateError::Header(_) => 4,
            MigrateError::Refused(_) => 5,
            MigrateError::Io { .. }
            | MigrateError::Cipher(_)
            | MigrateError::Invalid(_)
            | MigrateError::Mismatch(_) => 1,
        }
    }
}

/// The MAC of a checkpoint, hex: HMAC-SHA256 under `HKDF(volume key, salt = uuid,
/// LABEL_CHECKPOINT_MAC)` over `u32 len, kind | for each extra entry but "mac" (sorted):
/// u32 len, key, u32 len, value | u64 offset`. Stored as `extra.mac`; the checkpoint is outside
/// the header MAC (it changes during an operation) so it carries its own.
pub fn checkpoint_mac(key: &VolumeKey, h: &Header, c: &Checkpoint) -> String {
    let mut bytes = Vec::new();
    let mut put = |s: &[u8]| {
        bytes.extend_from_slice(&(s.len() as u32).to_be_bytes());
        bytes.extend_from_slice(s);
    };
    put(c.kind.as_bytes());
    for (k, v) in c.extra.iter().filter(|(k, _)| k.as_str() != "mac") {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    bytes.extend_from_slice(&c.offset.to_be_bytes());
    let sub = derive(key, h.uuid.as_bytes(), LABEL_CHECKPOINT_MAC);
    hex::encode(mac(&sub, &[&bytes]))
}

/// True if the checkpoint's `extra.mac` verifies under `key`.
pub fn checkpoint_verifies(key: &VolumeKey, h: &Header, c: &Checkpoint) -> bool {
    let Some(stored) = c.extra.get("mac") else { return false };
    mac_eq(checkpoint_mac(key, h, c).as_bytes(), stored.as_bytes())
}

/// Takes the device for exclusive use: `O_EXCL` on a block device (fails if it is mounted or
/// held, e.g. by a device-mapper target); a non-blocking exclusive `fcntl` record lock, which
/// `serve` takes too (shared or exclusive), so an offline operation refuses a served volume
/// and `serve` refuses a volume in the middle of one; and the exclusive `flock` that the
/// header-changing commands (`keyslot`, `rewrap`, `header restore`) take, so none of them
/// runs meanwhile. Keep the returned file open for the duration (and do not open and close
/// the device elsewhere in the process: closing any descriptor of a file drops its `fcntl`
/// locks).
pub fn lock_device(path: &Path) -> Result<File, MigrateError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_block = std::fs::metadata(path)
        .map_err(MigrateError::io(format!("cannot open {}", path.display())))?
        .file_type()
        .is_block_device();
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if is_block {
        o.custom_flags(libc::O_EXCL);
    }
    let f = o.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            MigrateError::Refused(format!("{} is in use (mounted, or held by another program)", path.display()))
        } else {
            MigrateError::Io { what: format!("cannot open {}", path.display()), source: e }
        }
    })?;
    use rustix::fs::{fcntl_lock, flock, FlockOperation};
    let busy = |what: &str| {
        MigrateError::Refused(format!("{} is in use by another nbdcrypt process ({what})", path.display()))
    };
    fcntl_lock(&f, FlockOperation::NonBlockingLockExclusive).map_err(|_| busy("served, or another operation"))?;
    flock(&f, FlockOperation::NonBlockingLockExclusive).map_err(|_| busy("a command changing its header"))?;
    Ok(f)
}
