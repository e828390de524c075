//! A fault-injecting in-memory backend for the reliability tests: a disk with a volatile
//! write cache that can lose power, and that can fail I/O on demand.
//!
//! # The disk model
//!
//! The backend keeps two images: `durable` (what the medium holds) and `current` (what reads
//! see: the medium plus the volatile cache). A write lands in `current` and is remembered as
//! *pending*; [`Backend::flush`] moves every pending write to `durable` (every write that has
//! returned before the flush is covered, as with fdatasync). [`FaultBackend::power_cut`]
//! freezes the disk and returns what the medium holds afterwards: the durable image plus, for
//! each *atomic unit* touched since the last flush, any one of the versions it went through
//! (its durable contents, or its contents after any of the pending writes that touched it):
//! a disk with a volatile cache may have written any of them back, in any order, before the
//! power went.
//!
//! Units are written whole or not at all (the usual promise of a disk for its logical block).
//! Tests use the encryption sector size as the unit. **Assumption**: a 4096-byte encryption
//! sector on a disk whose atomic unit is 512 bytes (512e) could tear in a real power cut and
//! then decrypts to noise; like LUKS2 with 4 KiB sectors, nbdcrypt cannot prevent that. Pass a
//! smaller unit to model such a disk.
//!
//! After a power cut every I/O fails with EIO (the disk is gone), so nothing that happens
//! afterwards can reach the frozen image.
//!
//! # Faults
//!
//! A [`FaultPlan`] gives the probability of each fault per call: EIO before anything is
//! done, ENOSPC, a short write (a prefix of random length reaches the cache, then the error a
//! `write_all_at` would return), a short read (a prefix is filled, then `UnexpectedEof`), and
//! a failed flush. A failed flush behaves as Linux does after a writeback error (the
//! "fsyncgate" semantics): the pending writes are dropped from the durable path (their pages
//! are marked clean) while reads still see them, so a later flush that succeeds proves
//! nothing about them. A concurrent flush may even return success before the failing one
//! returns its error (`flush_eio_return_us` widens that window).

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use super::Backend;

/// Probability of each fault, per call of the matching operation, in parts per million.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub read_eio: u32,
    pub read_short: u32,
    pub write_eio: u32,
    pub write_short: u32,
    pub write_enospc: u32,
    pub flush_eio: u32,
    /// How long a failing flush takes to return its error after it has released the disk,
    /// in microseconds: two concurrent fdatasync calls may return in either order, and only
    /// one of them reports a writeback error.
    pub flush_eio_return_us: u32,
    /// How long every flush takes, in microseconds (spent before it takes the disk's lock,
    /// so other I/O goes on meanwhile).
    pub flush_us: u32,
}

/// What [`FaultBackend::power_cut`] keeps of the writes since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing: the medium holds exactly what was flushed.
    DropAll,
    /// Everything: the cache had been written back just before the cut.
    KeepAll,
    /// For each unit independently, a random one of its versions.
    Random,
}

/// Counters of what the backend did and injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_eio: u64,
    pub read_short: u64,
    pub write_eio: u64,
    pub write_short: u64,
    pub write_enospc: u64,
    pub flush_eio: u64,
    /// Pending writes dropped by failed flushes.
    pub writes_lost_by_failed_flush: u64,
    pub power_cuts: u64,
    /// Units touched since the last flush at a power cut, by outcome.
    pub units_kept_latest: u64,
    pub units_kept_older: u64,
    pub units_dropped: u64,
}

impl FaultStats {
    /// Every fault injected into an I/O call (power cuts excluded).
    pub fn injected(&self) -> u64 {
        self.read_eio + self.read_short + self.write_eio + self.write_short + self.write_enospc + self.flush_eio
    }
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes since the last flush, oldest first: (offset, bytes).
    pending: Vec<(u64, Vec<u8>)>,
    plan: FaultPlan,
    rng: u64,
    dead: bool,
    stats: FaultStats,
}

impl State {
    fn next(&mut self) -> u64 {
        // xorshift64*: reproducible from the seed, plenty for choosing faults.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn hit(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.next() % 1_000_000 < u64::from(ppm)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn apply(&mut self, offset: usize, bytes: &[u8]) {
        self.current[offset..offset + bytes.len()].copy_from_slice(bytes);
        self.pending.push((offset as u64, bytes.to_vec()));
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct FaultBackend {
    state: Mutex<State>,
    size: u64,
    unit: usize,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultBackend {
    /// A disk holding `image` (durable), whose writes are atomic in `unit`-byte units, with
    /// faults and power-cut choices drawn from `seed`.
    pub fn new(image: Vec<u8>, unit: usize, seed: u64) -> Self {
        let size = image.len() as u64;
        let state = State {
            current: image.clone(),
            durable: image,
            pending: Vec::new(),
            plan: FaultPlan::default(),
            rng: seed | 1,
            dead: false,
            stats: FaultStats::default(),
        };
        FaultBackend { state: Mutex::new(state), size, unit: unit.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this test double; the
        // images are still usable for a diagnosis.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the fault plan (faults apply to calls made from now on).
    pub fn set_faults(&self, plan: FaultPlan) {
        self.lock().plan = plan;
    }

    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }

    /// What reads see now (medium + cache).
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// What the medium holds now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Cuts the power: chooses what the medium keeps of the pending writes (see the module
    /// documentation), makes every later call fail with EIO, and returns the medium's image.
    pub fn power_cut(&self, mode: CutMode) -> Vec<u8> {
        let mut st = self.lock();
        st.dead = true;
        st.stats.power_cuts += 1;
        let pending = std::mem::take(&mut st.pending);
        // Unit index -> the pending writes that touched it, oldest first.
        let mut touched: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let unit = self.unit as u64;
        for (i, (off, bytes)) in pending.iter().enumerate() {
            let end = off + bytes.len() as u64;
            for u in off / unit..end.div_ceil(unit) {
                touched.entry(u).or_default().push(i);
            }
        }
        let mut image = std::mem::take(&mut st.durable);
        for (u, writes) in touched {
            let keep = match mode {
                CutMode::DropAll => 0,
                CutMode::KeepAll => writes.len(),
                CutMode::Random => st.below(writes.len() as u64 + 1) as usize,
            };
            match keep {
                0 => st.stats.units_dropped += 1,
                k if k == writes.len() => st.stats.units_kept_latest += 1,
                _ => st.stats.units_kept_older += 1,
            }
            let (ustart, uend) = (u * unit, ((u + 1) * unit).min(self.size));
            for &i in &writes[..keep] {
                let (off, bytes) = &pending[i];
                let (s, e) = (ustart.max(*off), uend.min(off + bytes.len() as u64));
                let src = &bytes[(s - off) as usize..(e - off) as usize];
                image[s as usize..e as usize].copy_from_slice(src);
            }
        }
        st.durable = image.clone();
        image
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<usize> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.size);
        match end {
            Some(_) => Ok(offset as usize),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl Backend for FaultBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = self.range(offset, buf.len())?;
        let mut st = self.lock();
        if st.dead {
            return Err(eio());
        }
        st.stats.reads += 1;
        let plan = st.plan;
        if st.hit(plan.read_eio) {
            st.stats.read_eio += 1;
            return Err(eio());
        }
        if buf.len() > 1 && st.hit(plan.read_short) {
            st.stats.read_short += 1;
            let n = 1 + st.below(buf.len() as u64 - 1) as usize;
            buf[..n].copy_from_slice(&st.current[start..start + n]);
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"));
        }
        buf.copy_from_slice(&st.current[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = self.range(offset, buf.len())?;
        let mut st = self.lock();
        if st.dead {
            return Err(eio());
        }
        st.stats.writes += 1;
        let plan = st.plan;
        if st.hit(plan.write_eio) {
            st.stats.write_eio += 1;
            return Err(eio());
        }
        if st.hit(plan.write_enospc) {
            st.stats.write_enospc += 1;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if buf.len() > 1 && st.hit(plan.write_short) {
            st.stats.write_short += 1;
            let n = 1 + st.below(buf.len() as u64 - 1) as usize;
            st.apply(start, &buf[..n]);
            return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer"));
        }
        st.apply(start, buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let latency = self.lock().plan.flush_us;
        if latency > 0 {
            std::thread::sleep(std::time::Duration::from_micros(u64::from(latency)));
        }
        let mut st = self.lock();
        if st.dead {
            return Err(eio());
        }
        st.stats.flushes += 1;
        let pending = std::mem::take(&mut st.pending);
        let plan = st.plan;
        if st.hit(plan.flush_eio) {
            st.stats.flush_eio += 1;
            st.stats.writes_lost_by_failed_flush += pending.len() as u64;
            drop(st);
            if plan.flush_eio_return_us > 0 {
                std::thread::sleep(std::time::Duration::from_micros(u64::from(plan.flush_eio_return_us)));
            }
            return Err(eio());
        }
        for (off, bytes) in pending {
            let s = off as usize;
            st.durable[s..s + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.write_at(&vec![0u8; len], offset)
    }

    fn describe(&self) -> String {
        "fault-injecting memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> FaultBackend {
        FaultBackend::new(vec![0u8; 4096], 512, 7)
    }

    #[test]
    fn reads_see_unflushed_writes() {
        let d = disk();
        d.write_at(&[1; 512], 512).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [1; 512]);
        assert_eq!(d.durable_image()[512], 0);
    }

    #[test]
    fn flush_makes_completed_writes_durable() {
        let d = disk();
        d.write_at(&[1; 512], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2; 512], 512).unwrap();
        let img = d.power_cut(CutMode::DropAll);
        assert_eq!(&img[..512], &[1; 512]);
        assert_eq!(&img[512..1024], &[0; 512]);
    }

    #[test]
    fn keep_all_keeps_the_latest_version() {
        let d = disk();
        d.write_at(&[1; 1024], 0).unwrap();
        d.write_at(&[2; 512], 512).unwrap();
        let img = d.power_cut(CutMode::KeepAll);
        assert_eq!(&img[..512], &[1; 512]);
        assert_eq!(&img[512..1024], &[2; 512]);
        assert_eq!(d.stats().units_kept_latest, 2);
    }

    #[test]
    fn random_cut_keeps_whole_units_of_some_version() {
        for seed in 0..50 {
            let d = FaultBackend::new(vec![0u8; 4096], 512, seed);
            d.write_at(&[1; 4096], 0).unwrap();
            d.write_at(&[2; 2048], 1024).unwrap();
            let img = d.power_cut(CutMode::Random);
            for (u, unit) in img.chunks(512).enumerate() {
                let first = unit[0];
                assert!(unit.iter().all(|&b| b == first), "unit {u} torn");
                let allowed: &[u8] = if (2..6).contains(&u) { &[0, 1, 2] } else { &[0, 1] };
                assert!(allowed.contains(&first), "unit {u} holds {first}");
            }
        }
    }

    #[test]
    fn everything_fails_after_a_power_cut() {
        let d = disk();
        d.power_cut(CutMode::KeepAll);
        assert!(d.write_at(&[1; 512], 0).is_err());
        assert!(d.read_at(&mut [0; 512], 0).is_err());
        assert!(d.flush().is_err());
    }

    #[test]
    fn short_write_reaches_the_cache_and_fails() {
        let d = disk();
        d.set_faults(FaultPlan { write_short: 1_000_000, ..Default::default() });
        let err = d.write_at(&[9; 1024], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        let img = d.current_image();
        assert_eq!(img[0], 9);
        assert_eq!(img[1023], 0);
        assert_eq!(d.stats().write_short, 1);
    }

    #[test]
    fn failed_flush_loses_the_pending_writes_but_reads_still_see_them() {
        let d = disk();
        d.write_at(&[5; 512], 0).unwrap();
        d.set_faults(FaultPlan { flush_eio: 1_000_000, ..Default::default() });
        assert_eq!(d.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        d.set_faults(FaultPlan::default());
        d.flush().unwrap();
        assert_eq!(d.current_image()[0], 5);
        assert_eq!(d.power_cut(CutMode::KeepAll)[0], 0, "the write never reached the medium");
    }

    #[test]
    fn enospc_and_eio_change_nothing() {
        let d = disk();
        d.set_faults(FaultPlan { write_enospc: 1_000_000, ..Default::default() });
        assert_eq!(d.write_at(&[1; 512], 0).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        d.set_faults(FaultPlan { write_eio: 1_000_000, read_eio: 1_000_000, ..Default::default() });
        assert_eq!(d.write_at(&[1; 512], 0).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(d.read_at(&mut [0; 16], 0).is_err());
        assert_eq!(d.current_image(), vec![0u8; 4096]);
    }
}
