//! `nbdcrypt inspect`: the header, never key material.

use std::path::Path;

use super::{io_err, CmdError};
use crate::backend::FileBackend;
use crate::header::store;

pub(super) fn inspect(device: &Path, json: bool) -> Result<(), CmdError> {
    let dev = FileBackend::open(device, false).map_err(io_err(format!("cannot open {}", device.display())))?;
    let loaded = store::load(&dev)?;
    let h = &loaded.header;
    let copy = |s: &store::CopyState| match s {
        store::CopyState::Valid { seq } => format!("valid (seq {seq})"),
        store::CopyState::Blank => "blank".to_string(),
        store::CopyState::Damaged(why) => format!("damaged: {why}"),
    };
    if json {
        let slots: Vec<_> = h
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "provider": s.provider, "key_id": s.key_id,
                    "context": s.context, "created": s.created, "wrapped_bytes": s.wrapped.len(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "device": device.display().to_string(),
            "version": h.version, "sequence": h.seq, "uuid": h.uuid.to_string(),
            "cipher": h.cipher.to_string(), "key_bits": 512, "sector_size": h.sector_size.bytes(),
            "data_offset": h.data_offset, "data_size": h.data_size,
            "binding": h.binding.as_ref().map(|b| b.volume_id.clone()),
            "primary": copy(&loaded.primary), "secondary": copy(&loaded.secondary),
            "slots": slots,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("nbdcrypt header of {}", device.display());
    println!("  version:      {}", h.version);
    println!("  uuid:         {}", h.uuid);
    println!("  cipher:       {} (512-bit key)", h.cipher);
    println!("  sector size:  {}", h.sector_size);
    println!("  data offset:  {}", h.data_offset);
    println!("  data size:    {} ({:.2} GiB)", h.data_size, h.data_size as f64 / (1u64 << 30) as f64);
    println!("  sequence:     {}", h.seq);
    println!("  primary:      {}", copy(&loaded.primary));
    println!("  secondary:    {}", copy(&loaded.secondary));
    if let Some(b) = &h.binding {
        println!("  bound to:     {}", b.volume_id);
    }
    println!("  key slots:");
    for s in &h.slots {
        let ctx: Vec<_> = s.context.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("    {}: {} {} (context {})", s.id, s.provider, s.key_id, ctx.join(","));
    }
    Ok(())
}
