//! `nbdcrypt inspect` (the header, never key material), `inspect --dump-volume-key` (the one
//! place a plaintext key is ever printed, for emergency access).

use std::io::Write;
use std::path::Path;

use zeroize::Zeroizing;

use super::{confirm, io_err, keyring, CmdError};
use crate::backend::FileBackend;
use crate::cli::InspectArgs;
use crate::header::{store, Header};
use crate::volume;

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
            "zero_sectors": h.zero_sectors,
            "primary": copy(&loaded.primary), "secondary": copy(&loaded.secondary),
            "slots": slots,
            "in_progress": h.checkpoint.as_ref().map(|c| serde_json::json!({"kind": c.kind, "offset": c.offset})),
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
    if h.zero_sectors {
        println!("  sparse:       yes (all-zero raw sectors read as zeros; a dm-crypt table does not know this)");
    }
    if let Some(c) = &h.checkpoint {
        println!("  in progress:  unfinished {} (offset {}): rerun `nbdcrypt {}` to finish", c.kind, c.offset, c.kind);
    }
    println!("  key slots:");
    for s in &h.slots {
        let ctx: Vec<_> = s.context.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("    {}: {} {} (context {})", s.id, s.provider, s.key_id, ctx.join(","));
    }
    Ok(())
}

/// Unlocks the volume and prints its key and the dm-crypt table line that maps the data area
/// with the kernel's dm-crypt, so the data stays readable without nbdcrypt. Every string that
/// holds the key is zeroized when dropped.
pub(super) async fn dump_volume_key(args: InspectArgs) -> Result<(), CmdError> {
    if let Err(e) = crate::hardening::disable_core_dumps() {
        tracing::warn!(error = %e, "could not disable core dumps");
    }
    confirm(
        &format!(
            "print the plaintext volume key of {} (whoever sees it can decrypt the volume with no key provider)",
            args.device.display()
        ),
        args.yes,
    )?;
    let ring = keyring(&args.kek_file, &args.kms)?;
    let backend = volume::open_backend(&args.device, false)?;
    let u = volume::unlock_backend(backend, &ring).await?;
    let h = u.header();
    let key_hex = Zeroizing::new(hex::encode(u.key.expose()));
    let device = args.device.display().to_string();
    let table = dmcrypt_table(h, &key_hex, &device);
    let out = if args.json {
        let table_json = Zeroizing::new(serde_json::to_string(table.as_str()).unwrap_or_default());
        let device_json = serde_json::to_string(&device).unwrap_or_default();
        Zeroizing::new(format!(
            "{{\"device\":{device_json},\"uuid\":\"{}\",\"slot\":{},\"cipher\":\"{}\",\"volume_key\":\"{}\",\
             \"sector_size\":{},\"data_offset\":{},\"data_size\":{},\"dmcrypt_table\":{}}}\n",
            h.uuid,
            u.slot,
            h.cipher,
            key_hex.as_str(),
            h.sector_size.bytes(),
            h.data_offset,
            h.data_size,
            table_json.as_str()
        ))
    } else {
        Zeroizing::new(format!(
            "volume key ({}, 512 bits, opened through slot {}):\n{}\n\ndm-crypt table (dmsetup create NAME --table '...'; \
             a file needs a loop device first):\n{}\n",
            h.cipher,
            u.slot,
            key_hex.as_str(),
            table.as_str()
        ))
    };
    if h.zero_sectors {
        // dm-crypt decrypts a never-written (all-zero) sector to noise, where nbdcrypt reads
        // zeros: a filesystem that relies on zeroed blocks would see garbage there.
        eprintln!(
            "nbdcrypt: warning: {device} is sparse (zero_sectors): dm-crypt with this table reads its unwritten \
             sectors as noise, not zeros; run `nbdcrypt reencrypt` first (it writes every sector) or read it \
             through `nbdcrypt serve`"
        );
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush()).map_err(io_err("writing to stdout"))?;
    tracing::warn!(device = %device, slot = u.slot, "printed the plaintext volume key");
    Ok(())
}

/// The dm-crypt table line for the data area (kernel `dm-crypt.rst`):
/// `<start> <size> crypt <cipher> <key> <iv_offset> <device> <offset> [<#opt_params> <opt_params>]`,
/// sizes and offsets in 512-byte sectors. nbdcrypt's tweak counts sectors of the volume's
/// sector size from the start of the data area: iv_offset 0, and for 4096-byte sectors the
/// two options `sector_size:4096` and `iv_large_sectors` (IVs in sector-size units, as LUKS2).
fn dmcrypt_table(h: &Header, key_hex: &str, device: &str) -> Zeroizing<String> {
    let opts = match h.sector_size.bytes() {
        512 => String::new(),
        ss => format!(" 2 sector_size:{ss} iv_large_sectors"),
    };
    Zeroizing::new(format!(
        "0 {} crypt {} {key_hex} 0 {device} {}{opts}",
        h.data_size / 512,
        h.cipher,
        h.data_offset / 512
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::VolumeKey;
    use crate::header::DEFAULT_DATA_OFFSET;
    use crate::units::SectorSize;

    fn header(ss: SectorSize) -> Header {
        let key = VolumeKey::from_slice(&[7u8; 64]).unwrap();
        Header::new(uuid::Uuid::nil(), ss, DEFAULT_DATA_OFFSET, 8 << 20, None, &key).unwrap()
    }

    #[test]
    fn dmcrypt_table_for_4096_byte_sectors_counts_both_options() {
        let t = dmcrypt_table(&header(SectorSize::S4096), "ab", "/dev/x");
        assert_eq!(t.as_str(), "0 16384 crypt aes-xts-plain64 ab 0 /dev/x 4096 2 sector_size:4096 iv_large_sectors");
    }

    #[test]
    fn dmcrypt_table_for_512_byte_sectors_has_no_options() {
        let t = dmcrypt_table(&header(SectorSize::S512), "ab", "/dev/x");
        assert_eq!(t.as_str(), "0 16384 crypt aes-xts-plain64 ab 0 /dev/x 4096");
    }
}
