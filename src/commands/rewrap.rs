//! `nbdcrypt rewrap`: put one key slot under another key, without re-encrypting any data.
//!
//! When the slot is a KMS slot and the new key is a KMS key, KMS `ReEncrypt` turns the old
//! ciphertext blob into one under the new key inside KMS: the plaintext volume key never
//! reaches this host (the caller needs kms:ReEncryptFrom on the old key and kms:ReEncryptTo
//! on the new one). Otherwise the volume is unlocked through any slot, the key is wrapped
//! with the new provider in memory, and the new slot is unwrapped once to prove it opens.
//! The slot keeps its id and encryption context; the header is written with
//! `store::update` (crash-safe: the old header or the new one).

use super::{keyring, keyslot, now_secs, CmdError};
use crate::cli::RewrapArgs;
use crate::header::{store, KeySlot};
use crate::keys::{kms, KeyError, KeySpec};
use crate::volume::{self, VolumeError};

pub(super) async fn rewrap(args: RewrapArgs) -> Result<(), CmdError> {
    let ring = keyring(&args.kek_file, &args.kms)?;
    let _lock = super::lock_header(&args.device)?;
    let backend = volume::open_backend(&args.device, true)?;
    let loaded = store::load(backend.as_ref())?;
    let h = &loaded.header;
    let Some(old) = h.slot(args.slot).cloned() else {
        let ids: Vec<_> = h.slots.iter().map(|s| s.id.to_string()).collect();
        return Err(CmdError::Usage(format!("there is no slot {}; the slots are {}", args.slot, ids.join(", "))));
    };
    let (new, how) = match (&args.to, ring.kms()) {
        (KeySpec::AwsKms(dest), Some(factory)) if old.provider == kms::KIND => {
            let p = factory.provider(dest).await.map_err(KeyError::from)?;
            let w = p.reencrypt_slot(&old).await.map_err(KeyError::from)?;
            let slot = KeySlot {
                id: old.id,
                provider: kms::KIND.into(),
                key_id: w.key_id,
                wrapped: w.ciphertext,
                context: old.context.clone(),
                created: now_secs(),
            };
            (slot, "KMS ReEncrypt: the volume key never left KMS".to_owned())
        }
        _ => {
            let dest = ring.provider_for_spec(&args.to).await?;
            let (key, opened) = volume::unlock(h, &ring).await?;
            h.verify_mac(&key).map_err(VolumeError::Tampered)?;
            let slot = keyslot::wrap_verified(dest.as_ref(), h, &key, old.id, old.context.clone()).await?;
            (slot, format!("unwrapped through slot {opened}, wrapped again in memory, checked to open"))
        }
    };
    let mut updated = h.clone();
    for s in updated.slots.iter_mut() {
        if s.id == old.id {
            *s = new.clone();
        }
    }
    store::update(backend.as_ref(), &loaded, &mut updated)?;
    println!(
        "rewrapped slot {} of {}: {} {} -> {} {} ({how})",
        old.id,
        args.device.display(),
        old.provider,
        old.key_id,
        new.provider,
        new.key_id
    );
    Ok(())
}
