//! `nbdcrypt migrate`: copy a source (plaintext) into the data area of an encrypted target,
//! checkpointing progress in the target's header, and optionally verify.
//!
//! The target header carries a checkpoint of kind `migrate` from the moment it is written
//! (format and checkpoint are one `write_new`, so no crash can leave a target that looks
//! complete): `offset` is how many source bytes are durably copied, `extra` holds the source's
//! size and fingerprint ([`super::source::fingerprint`]) and a MAC under the volume key. The
//! checkpoint only moves forward after an fdatasync of the data it counts, so it never claims
//! more than is on disk; a resumed run starts at `offset` and, XTS being deterministic, writes
//! exactly what an uninterrupted run would have. `serve` refuses a volume with a checkpoint.

use std::sync::mpsc;

use crate::backend::Backend;
use crate::crypto::{SectorCipher, VolumeKey};
use crate::header::{store, Checkpoint, Header};

use super::progress::Progress;
use super::source::Source;
use super::{checkpoint_mac, checkpoint_verifies, fault, MigrateError};

/// Checkpoint kind of a migration target.
pub const KIND: &str = "migrate";
/// Bytes per read from the source.
pub const CHUNK: usize = 4 << 20;
/// Default checkpoint interval (`NBDCRYPT_CHECKPOINT_MIB` overrides).
pub const DEFAULT_CHECKPOINT: u64 = 256 << 20;

/// The checkpoint of a migration of a source of `size` bytes with fingerprint `fp`, at
/// `offset`, MACed under `key`.
pub fn checkpoint(key: &VolumeKey, h: &Header, offset: u64, size: u64, fp: &[u8; 32]) -> Checkpoint {
    let mut c = Checkpoint { kind: KIND.into(), offset, extra: Default::default() };
    c.extra.insert("source_size".into(), size.to_string());
    c.extra.insert("source_fingerprint".into(), hex::encode(fp));
    let tag = checkpoint_mac(key, h, &c);
    c.extra.insert("mac".into(), tag);
    c
}

/// Where a target's migration checkpoint says to resume, if it is a migration of this very
/// source (same size and fingerprint) and verifies under the key; an error otherwise.
pub fn resume_offset(key: &VolumeKey, h: &Header, size: u64, fp: &[u8; 32]) -> Result<u64, MigrateError> {
    let Some(c) = h.checkpoint.as_ref().filter(|c| c.kind == KIND) else {
        return Err(MigrateError::Refused("the target is not in the middle of a migration".into()));
    };
    if !checkpoint_verifies(key, h, c) {
        return Err(MigrateError::Refused("the target's migration checkpoint does not verify (tampered?)".into()));
    }
    let same = c.extra.get("source_size") == Some(&size.to_string())
        && c.extra.get("source_fingerprint") == Some(&hex::encode(fp));
    if !same {
        return Err(MigrateError::Refused(
            "the target is in the middle of a migration from another source (or the source changed since); \
             use --yes to start over"
                .into(),
        ));
    }
    Ok(c.offset.min(size))
}

/// Copies `src[from..]` into the target's data area, encrypted, checkpointing every `every`
/// bytes, then clears the checkpoint. `h` is the target header as loaded.
pub fn copy(
    src: &mut dyn Source,
    dev: &dyn Backend,
    key: &VolumeKey,
    from: u64,
    every: u64,
    progress: &mut Progress,
) -> Result<(), MigrateError> {
    let loaded = store::load(dev)?;
    let h = loaded.header.clone();
    let size = src.size();
    let ss = h.sector_size;
    let fp = match &h.checkpoint {
        Some(c) => c.extra.get("source_fingerprint").cloned().unwrap_or_default(),
        None => return Err(MigrateError::Invalid("the target has no migration checkpoint".into())),
    };
    let mut fp_bytes = [0u8; 32];
    hex::decode_to_slice(&fp, &mut fp_bytes).map_err(|_| MigrateError::Invalid("bad fingerprint".into()))?;
    let cipher = SectorCipher::new(key, ss)?;
    let mut loaded = loaded;
    let mut since = 0u64;
    progress.update(from);
    let (tx, rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>), MigrateError>>(2);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| -> Result<(), MigrateError> {
        scope.spawn(move || {
            let mut off = from;
            while off < size {
                let n = CHUNK.min((size - off) as usize);
                let mut buf = back_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
                buf.resize(n, 0);
                let r = src.read_at(&mut buf, off).map_err(MigrateError::io(format!("reading the source at {off}")));
                let failed = r.is_err();
                if tx.send(r.map(|()| (off, buf))).is_err() || failed {
                    return;
                }
                off += n as u64;
            }
        });
        for msg in rx {
            let (off, mut buf) = msg?;
            let n = buf.len() as u64;
            let padded = ss.align_up(n).ok_or_else(|| MigrateError::Invalid("size overflow".into()))?;
            buf.resize(padded as usize, 0);
            cipher.encrypt(ss.sector_of(off), &mut buf)?;
            dev.write_at(&buf, h.data_offset + off).map_err(MigrateError::io("writing the target"))?;
            let _ = back_tx.send(buf);
            since += n;
            let done = off + n;
            if since >= every && done < size {
                dev.flush().map_err(MigrateError::io("flushing the target"))?;
                let mut next = h.clone();
                next.checkpoint = Some(checkpoint(key, &h, done, size, &fp_bytes));
                store::update(dev, &loaded, &mut next)?;
                loaded = store::load(dev)?;
                since = 0;
            }
            progress.update(done);
            fault::throttle();
        }
        Ok(())
    })?;
    dev.flush().map_err(MigrateError::io("flushing the target"))?;
    let mut fin = h.clone();
    fin.checkpoint = None;
    store::update(dev, &loaded, &mut fin)?;
    progress.finish(size);
    Ok(())
}

/// Re-reads the source and the target and compares every byte (the target decrypted); the
/// target's data area must also be zero past the source's end.
pub fn verify(src: &mut dyn Source, dev: &dyn Backend, h: &Header, key: &VolumeKey) -> Result<(), MigrateError> {
    let cipher = SectorCipher::new(key, h.sector_size)?;
    let size = src.size();
    if h.data_size < size {
        return Err(MigrateError::Mismatch(format!("the target holds {} bytes, the source {size}", h.data_size)));
    }
    let mut progress = Progress::new("verify", h.data_size);
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < h.data_size {
        let n = CHUNK.min((h.data_size - off) as usize);
        let (sa, sb) = (&mut a[..n], &mut b[..n]);
        dev.read_at(sb, h.data_offset + off).map_err(MigrateError::io("reading the target"))?;
        cipher.decrypt(h.sector_size.sector_of(off), sb)?;
        let in_src = size.saturating_sub(off).min(n as u64) as usize;
        src.read_at(&mut sa[..in_src], off).map_err(MigrateError::io(format!("reading the source at {off}")))?;
        sa[in_src..].fill(0);
        if sa != sb {
            let i = sa.iter().zip(sb.iter()).position(|(x, y)| x != y).unwrap_or(0);
            return Err(MigrateError::Mismatch(format!("first difference at byte {}", off + i as u64)));
        }
        off += n as u64;
        progress.update(off);
    }
    progress.finish(off);
    Ok(())
}
