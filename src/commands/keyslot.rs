//! `nbdcrypt keyslot list|add|remove`: the copies of the volume key, as cryptsetup's
//! `luksAddKey` / `luksKillSlot` manage LUKS keyslots.
//!
//! Adding and removing change only the slots, which are outside the header MAC (see
//! `docs/header-format.md`), but both still unlock the volume first: `add` needs the key to
//! wrap it, and `remove` proves that another slot still opens the volume, so that removing a
//! slot can never be what makes a volume unreadable. Both write with `store::update` (stale
//! copy first, then the other: a crash leaves the old header or the new one).

use super::{confirm, keyring, now_secs, CmdError};
use crate::backend::FileBackend;
use crate::cli::{KeyslotAddArgs, KeyslotCommand, KeyslotRemoveArgs};
use crate::header::{store, Header, KeySlot};
use crate::keys::{self, KeyProvider};
use crate::volume::{self, VolumeError};

pub(super) async fn run(cmd: KeyslotCommand) -> Result<(), CmdError> {
    match cmd {
        KeyslotCommand::List { device, json } => list(&device, json),
        KeyslotCommand::Add(args) => add(args).await,
        KeyslotCommand::Remove(args) => remove(args).await,
    }
}

fn list(device: &std::path::Path, json: bool) -> Result<(), CmdError> {
    let dev = FileBackend::open(device, false).map_err(super::io_err(format!("cannot open {}", device.display())))?;
    let loaded = store::load(&dev)?;
    let h = &loaded.header;
    if json {
        let slots: Vec<_> = h
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "provider": s.provider, "key_id": s.key_id, "context": s.context,
                    "created": s.created, "wrapped_bytes": s.wrapped.len(),
                })
            })
            .collect();
        let v = serde_json::json!({ "uuid": h.uuid.to_string(), "slots": slots });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("key slots of {} (volume {}):", device.display(), h.uuid);
    for s in &h.slots {
        println!("  {}", describe(s));
    }
    Ok(())
}

/// One line per slot: id, provider, key, creation time, context.
pub(super) fn describe(s: &KeySlot) -> String {
    let ctx: Vec<_> = s.context.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("slot {}: {} {} (created {}; context {})", s.id, s.provider, s.key_id, utc(s.created), ctx.join(","))
}

async fn add(args: KeyslotAddArgs) -> Result<(), CmdError> {
    let ring = keyring(&args.kek_file, &args.kms)?;
    let new_provider = ring.provider_for_spec(&args.key).await?;
    let _lock = super::lock_header(&args.device)?;
    let backend = volume::open_backend(&args.device, true)?;
    let u = volume::unlock_backend(backend.clone(), &ring).await?;
    let h = u.header();
    let id = h
        .next_slot_id()
        .ok_or_else(|| CmdError::Refused(format!("all {} key slots are in use", crate::header::MAX_SLOTS)))?;
    let binding = h.binding.as_ref().map(|b| b.volume_id.as_str());
    let ctx = keys::slot_context(&h.uuid, binding, &args.context).map_err(CmdError::Usage)?;
    let slot = wrap_verified(new_provider.as_ref(), h, &u.key, id, ctx).await?;
    if let Some(dup) = h.slots.iter().find(|s| s.provider == slot.provider && s.key_id == slot.key_id) {
        return Err(CmdError::Usage(format!(
            "slot {} already wraps the volume key with {} {}; use `nbdcrypt rewrap` to rotate it",
            dup.id, dup.provider, dup.key_id
        )));
    }
    let line = describe(&slot);
    let mut new = h.clone();
    new.slots.push(slot);
    store::update(backend.as_ref(), &u.loaded, &mut new)?;
    println!("added {line} (the volume was opened through slot {})", u.slot);
    Ok(())
}

/// Wraps `key` with `provider` into slot `id`, then unwraps the result and checks it against
/// the header: a slot whose key cannot unwrap (e.g. a role allowed to Encrypt but not to
/// Decrypt) is found now, not on the day it is needed.
pub(super) async fn wrap_verified(
    provider: &dyn KeyProvider,
    h: &Header,
    key: &crate::crypto::VolumeKey,
    id: u32,
    context: keys::EncryptionContext,
) -> Result<KeySlot, CmdError> {
    let w = provider.wrap(key, &context).await?;
    let slot = KeySlot {
        id,
        provider: provider.kind().into(),
        key_id: w.key_id,
        wrapped: w.ciphertext,
        context,
        created: now_secs(),
    };
    let back = provider.unwrap(&slot).await?;
    if !h.key_matches(&back) {
        return Err(CmdError::Volume(VolumeError::KeyMismatch { slot: id }));
    }
    Ok(slot)
}

async fn remove(args: KeyslotRemoveArgs) -> Result<(), CmdError> {
    let _lock = super::lock_header(&args.device)?;
    let backend = volume::open_backend(&args.device, true)?;
    let loaded = store::load(backend.as_ref())?;
    let h = &loaded.header;
    let Some(victim) = h.slot(args.slot) else {
        let ids: Vec<_> = h.slots.iter().map(|s| s.id.to_string()).collect();
        return Err(CmdError::Usage(format!("there is no slot {}; the slots are {}", args.slot, ids.join(", "))));
    };
    if h.slots.len() == 1 {
        return Err(CmdError::Refused(format!(
            "slot {} is the last key slot: without it nothing can ever unlock the volume",
            args.slot
        )));
    }
    confirm(
        &format!(
            "remove key slot {} ({} {}) from {}",
            victim.id,
            victim.provider,
            victim.key_id,
            args.device.display()
        ),
        args.yes,
    )?;
    let ring = keyring(&args.kek_file, &args.kms)?;
    // Prove another slot opens the volume before this one goes.
    let (key, opened) = volume::unlock_where(h, &ring, |s| s.id != args.slot).await?;
    h.verify_mac(&key).map_err(VolumeError::Tampered)?;
    drop(key);
    let mut new = h.clone();
    new.slots.retain(|s| s.id != args.slot);
    store::update(backend.as_ref(), &loaded, &mut new)?;
    let left: Vec<_> = new.slots.iter().map(|s| s.id.to_string()).collect();
    println!(
        "removed slot {} from {}; remaining slots {} (slot {opened} was checked to open the volume)",
        args.slot,
        args.device.display(),
        left.join(", ")
    );
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (proleptic Gregorian, UTC).
pub(super) fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant), for days since 1970-01-01; u64 keeps it non-negative.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
