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
//! Copying runs on one worker per core with a separate flusher thread (see [`copy`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use crate::backend::Backend;
use crate::crypto::{is_zero, SectorCipher, VolumeKey};
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

/// How often (bytes) the flusher thread is asked to fdatasync, so that dirty data never piles
/// up and a checkpoint never has much to wait for.
const FLUSH_STEP: u64 = 64 << 20;

/// Copies `src[from..]` into the target's data area, encrypted, then clears the checkpoint.
///
/// Worker threads (one per core, at least two) each take the next 4 MiB chunk, read it (reads
/// are serialised: an NBD source is one connection), encrypt it and write it at its own
/// offset. The calling thread tracks the *watermark*, the end of the contiguous prefix of
/// chunks written, and every `FLUSH_STEP` hands it to a flusher thread, which fdatasyncs
/// and, every `every` bytes, moves the header checkpoint to that watermark. A watermark is
/// only sent after every write below it completed and is only recorded after a flush that
/// began after that, so the checkpoint never claims more than is durable; copying goes on
/// while the flusher waits on the disk.
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
    progress.update(from);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let src = Mutex::new(src);
    let chunk = CHUNK as u64;
    let (done_tx, done_rx) = mpsc::channel::<Result<(u64, u64), MigrateError>>();
    let (flush_tx, flush_rx) = mpsc::channel::<u64>();
    let result = std::thread::scope(|scope| -> Result<(), MigrateError> {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let (next, stop, src, cipher, h) = (&next, &stop, &src, &cipher, &h);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(CHUNK);
                while !stop.load(Ordering::Relaxed) {
                    let off = next.fetch_add(1, Ordering::Relaxed).saturating_mul(chunk).saturating_add(from);
                    if off >= size {
                        break;
                    }
                    let n = chunk.min(size - off);
                    let r = copy_chunk(src, dev, cipher, h, off, n, &mut buf);
                    let failed = r.is_err();
                    if failed {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if done_tx.send(r.map(|()| (off, n))).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let flusher = {
            let (h, stop) = (&h, &stop);
            scope.spawn(move || -> Result<(), MigrateError> {
                let mut loaded = loaded;
                let mut recorded = from;
                while let Ok(mut mark) = flush_rx.recv() {
                    while let Ok(m) = flush_rx.try_recv() {
                        mark = m;
                    }
                    let r = (|| {
                        dev.flush().map_err(MigrateError::io("flushing the target"))?;
                        if mark - recorded >= every && mark < size {
                            let mut next = h.clone();
                            next.checkpoint = Some(checkpoint(key, h, mark, size, &fp_bytes));
                            store::update(dev, &loaded, &mut next)?;
                            loaded = store::load(dev)?;
                            recorded = mark;
                        }
                        Ok(())
                    })();
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                        return r;
                    }
                }
                Ok(())
            })
        };
        let mut watermark = from;
        let mut sent = from;
        let mut ahead = std::collections::BTreeMap::new();
        let mut first_err = None;
        for msg in done_rx {
            match msg {
                Ok((off, n)) => {
                    ahead.insert(off, n);
                }
                Err(e) => {
                    // Keep draining: the other workers finish their chunk, and what they
                    // wrote still gets checkpointed below.
                    stop.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
            while let Some(n) = ahead.remove(&watermark) {
                watermark += n;
            }
            if watermark - sent >= FLUSH_STEP.min(every) && watermark < size {
                sent = watermark;
                let _ = flush_tx.send(watermark);
            }
            progress.update(watermark);
            fault::throttle();
        }
        if first_err.is_some() && watermark > sent {
            let _ = flush_tx.send(watermark);
        }
        stop.store(true, Ordering::Relaxed);
        drop(flush_tx);
        let flushed =
            flusher.join().unwrap_or_else(|_| Err(MigrateError::Invalid("the flusher thread panicked".into())));
        match first_err {
            Some(e) => Err(e),
            None => flushed,
        }
    });
    result?;
    dev.flush().map_err(MigrateError::io("flushing the target"))?;
    let loaded = store::load(dev)?;
    let mut fin = h.clone();
    fin.checkpoint = None;
    store::update(dev, &loaded, &mut fin)?;
    progress.finish(size);
    Ok(())
}

/// One chunk: read `n` bytes at `off` from the source, pad to the sector size with zeros,
/// encrypt, write into the data area.
fn copy_chunk(
    src: &Mutex<&mut dyn Source>,
    dev: &dyn Backend,
    cipher: &SectorCipher,
    h: &Header,
    off: u64,
    n: u64,
    buf: &mut Vec<u8>,
) -> Result<(), MigrateError> {
    buf.resize(n as usize, 0);
    {
        let mut s = src.lock().map_err(|_| MigrateError::Invalid("a reader thread panicked".into()))?;
        s.read_at(buf, off).map_err(MigrateError::io(format!("reading the source at {off}")))?;
    }
    let padded = h.sector_size.align_up(n).ok_or_else(|| MigrateError::Invalid("size overflow".into()))?;
    buf.resize(padded as usize, 0);
    if !h.zero_sectors {
        return write_encrypted(dev, cipher, h, off, buf, 0);
    }
    // A sparse target: runs of at least SPARSE_RUN zero bytes become zeros on the target (a
    // hole where it can), which the header's `zero_sectors` reads back as zeros; the rest is
    // encrypted, shorter zero runs included (not worth a system call each).
    let ss = h.sector_size.bytes_usize();
    // `data` is where the bytes not yet written or zeroed begin.
    let (mut data, mut at) = (0, 0);
    while at < buf.len() {
        if !is_zero(&buf[at..at + ss]) {
            at += ss;
            continue;
        }
        let zeros = at;
        while at < buf.len() && is_zero(&buf[at..at + ss]) {
            at += ss;
        }
        if at - zeros >= SPARSE_RUN {
            write_encrypted(dev, cipher, h, off, &mut buf[..zeros], data)?;
            let target = h.data_offset + off + zeros as u64;
            dev.zero_range(target, (at - zeros) as u64).map_err(MigrateError::io("zeroing the target"))?;
            data = at;
        }
    }
    write_encrypted(dev, cipher, h, off, buf, data)
}

/// Encrypts `buf[from..]` (the chunk at data offset `off`) and writes it, if not empty.
fn write_encrypted(
    dev: &dyn Backend,
    cipher: &SectorCipher,
    h: &Header,
    off: u64,
    buf: &mut [u8],
    from: usize,
) -> Result<(), MigrateError> {
    let Some(data) = buf.get_mut(from..).filter(|d| !d.is_empty()) else { return Ok(()) };
    cipher.encrypt(h.sector_size.sector_of(off + from as u64), data)?;
    let target = h.data_offset + off + from as u64;
    dev.write_at(data, target).map_err(MigrateError::io("writing the target"))
}

/// The shortest run of zeros a sparse migration leaves unwritten (a hole) rather than
/// encrypting it.
const SPARSE_RUN: usize = 64 << 10;

/// Re-reads the source and the target and compares every byte (the target decrypted); the
/// target's data area must also be zero past the source's end.
pub fn verify(src: &mut dyn Source, dev: &dyn Backend, h: &Header, key: &VolumeKey) -> Result<(), MigrateError> {
    let cipher = SectorCipher::new(key, h.sector_size)?.with_zero_sectors(h.zero_sectors);
    let size = src.size();
    if h.data_size < size {
        return Err(MigrateError::Mismatch(format!("the target holds {} bytes, the source {size}", h.data_size)));
    }
    let mut progress = Progress::new("verify", h.data_size);
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut off = 0u64;
    progress.update(0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::header::tests::key;
    use crate::header::DEFAULT_DATA_OFFSET;
    use crate::units::SectorSize;

    /// An in-memory source that fails every read at or past `fail_at`.
    struct MemSource {
        data: Vec<u8>,
        fail_at: u64,
    }

    impl Source for MemSource {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if offset + buf.len() as u64 > self.fail_at {
                return Err(std::io::Error::other("source went away"));
            }
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    fn target(src: &mut MemSource) -> (MemBackend, VolumeKey) {
        target_with(src, false)
    }

    fn target_with(src: &mut MemSource, zero_sectors: bool) -> (MemBackend, VolumeKey) {
        let k = key(4);
        let size = src.size();
        let dev = MemBackend::new((DEFAULT_DATA_OFFSET + size + 8192) as usize);
        let mut h = Header::new(uuid::Uuid::from_bytes([5; 16]), SectorSize::S512, DEFAULT_DATA_OFFSET, size, None, &k)
            .unwrap();
        h.zero_sectors = zero_sectors;
        h.reseal(&k);
        let fp = super::super::source::fingerprint(src).unwrap();
        h.checkpoint = Some(checkpoint(&k, &h, 0, size, &fp));
        store::write_new(&dev, &mut h).unwrap();
        (dev, k)
    }

    fn data_area(dev: &MemBackend) -> Vec<u8> {
        dev.snapshot()[DEFAULT_DATA_OFFSET as usize..].to_vec()
    }

    #[test]
    fn a_resumed_copy_writes_exactly_what_an_uninterrupted_one_does() {
        let data: Vec<u8> = (0..(11 << 20) + 512).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut whole = MemSource { data: data.clone(), fail_at: u64::MAX };
        let (dev_a, k) = target(&mut whole);
        let n = whole.size();
        copy(&mut whole, &dev_a, &k, 0, 1 << 20, &mut Progress::new("t", n)).unwrap();

        let mut flaky = MemSource { data, fail_at: u64::MAX };
        let (dev_b, _) = target(&mut flaky);
        flaky.fail_at = 9 << 20;
        assert!(copy(&mut flaky, &dev_b, &k, 0, 1 << 20, &mut Progress::new("t", n)).is_err());
        flaky.fail_at = u64::MAX;
        let h = store::load(&dev_b).unwrap().header;
        let fp = super::super::source::fingerprint(&mut flaky).unwrap();
        let from = resume_offset(&k, &h, n, &fp).unwrap();
        assert!(from > 0 && from < 9 << 20, "checkpoint at {from}");
        copy(&mut flaky, &dev_b, &k, from, 1 << 20, &mut Progress::new("t", n)).unwrap();

        assert!(data_area(&dev_a) == data_area(&dev_b), "resumed copy differs");
        let fin = store::load(&dev_b).unwrap().header;
        assert!(fin.checkpoint.is_none());
        verify(&mut flaky, &dev_b, &fin, &k).unwrap();
    }

    #[test]
    fn a_checkpoint_for_another_source_or_key_is_refused() {
        let mut src = MemSource { data: vec![7; 1 << 20], fail_at: u64::MAX };
        let (dev, k) = target(&mut src);
        let h = store::load(&dev).unwrap().header;
        let fp = super::super::source::fingerprint(&mut src).unwrap();
        assert!(resume_offset(&k, &h, 1 << 20, &fp).is_ok());
        assert!(matches!(resume_offset(&k, &h, 1 << 20, &[0; 32]), Err(MigrateError::Refused(_))));
        assert!(matches!(resume_offset(&key(9), &h, 1 << 20, &fp), Err(MigrateError::Refused(_))));
    }

    #[test]
    fn a_sparse_copy_leaves_long_zero_runs_raw_and_encrypts_the_rest() {
        // data 4K | zeros 8K (short: encrypted) | data 4K | zeros 192K (long: left zero) | data 1K
        let runs: [(usize, bool); 5] = [(4096, true), (8192, false), (4096, true), (192 << 10, false), (1024, true)];
        let mut data = Vec::new();
        for (len, filled) in runs {
            data.extend((0..len).map(|i| if filled { (i % 251) as u8 + 1 } else { 0 }));
        }
        let mut src = MemSource { data, fail_at: u64::MAX };
        let (dev, k) = target_with(&mut src, true);
        let n = src.size();
        copy(&mut src, &dev, &k, 0, 1 << 20, &mut Progress::new("t", n)).unwrap();
        let raw = data_area(&dev);
        let all_zero = |a: usize, b: usize| raw[a..b].iter().all(|&x| x == 0);
        assert!(!all_zero(4096, 4096 + 512), "a short zero run is encrypted");
        let long = 16 << 10;
        assert!(all_zero(long, long + (192 << 10)), "a long zero run stays raw zeros");
        assert!(!all_zero(long + (192 << 10), long + (192 << 10) + 512), "data after it is encrypted");
        let h = store::load(&dev).unwrap().header;
        assert!(h.zero_sectors && h.checkpoint.is_none());
        verify(&mut src, &dev, &h, &k).unwrap();
    }
}
