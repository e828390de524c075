//! One served volume: the data area of a raw volume, seen through the sector cipher.
//!
//! Requests arrive in data-area byte offsets. Whole sectors are encrypted in place and
//! written at `data_offset + offset`; requests that do not cover whole encryption sectors are
//! served by read-modify-write of the partial head and tail sectors. Every write (and zero,
//! trim) holds a lock on the sector range it touches, so an RMW never interleaves with another
//! write to the same sector; reads take no lock (NBD gives no ordering between overlapping
//! requests in flight, and each sector is written whole).
//!
//! This is also the one place where failures become NBD errnos: [`ExportError::errno`].

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use crate::backend::Backend;
use crate::buf::AlignedBuf;
use crate::crypto::{CipherError, SectorCipher};
use crate::nbd::proto;
use crate::units::{ByteRange, SectorIndex, SectorSize};

/// Largest request payload the export accepts (advertised as the NBD maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;

/// Zeroing is done in chunks of this many bytes, to bound the buffer.
const ZERO_CHUNK: usize = 1 << 20;

/// The page size: buffered writes of whole pages never read from the device first.
const PAGE: u64 = 4096;

/// Why a request failed. Each variant maps to exactly one NBD errno in [`ExportError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A read or cache request reaches past the end of the export.
    #[error("read of {len} bytes at offset {offset} is past the end of the export ({size} bytes)")]
    ReadOutOfRange { offset: u64, len: u64, size: u64 },
    /// A write, zero or trim request reaches past the end of the export.
    #[error("write of {len} bytes at offset {offset} is past the end of the export ({size} bytes)")]
    WriteOutOfRange { offset: u64, len: u64, size: u64 },
    /// The export is read-only.
    #[error("the export is read-only")]
    ReadOnly,
    /// The request is larger than the advertised maximum.
    #[error("request of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u32 },
    /// The operation cannot be done as asked (e.g. a fast zero that would be emulated).
    #[error("{0} is not supported by this export")]
    NotSupported(&'static str),
    /// The raw volume is full (ENOSPC from a sparse file on a full filesystem).
    #[error("the raw volume is out of space")]
    NoSpace(#[source] io::Error),
    /// The raw volume failed an I/O.
    #[error("I/O error on the raw volume")]
    Io(#[source] io::Error),
    /// The sector cipher failed (never expected: its preconditions are checked at open).
    #[error("sector cipher failed")]
    Cipher(#[from] CipherError),
}

impl ExportError {
    /// The NBD error code for the reply. Exhaustive on purpose: a new variant must pick one.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::ReadOutOfRange { .. } => proto::EINVAL,
            ExportError::WriteOutOfRange { .. } => proto::ENOSPC,
            ExportError::ReadOnly => proto::EPERM,
            ExportError::TooLarge { .. } => proto::EINVAL,
            ExportError::NotSupported(_) => proto::ENOTSUP,
            ExportError::NoSpace(_) => proto::ENOSPC,
            ExportError::Io(_) => proto::EIO,
            ExportError::Cipher(_) => proto::EIO,
        }
    }
}

impl From<io::Error> for ExportError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull {
            ExportError::NoSpace(e)
        } else {
            ExportError::Io(e)
        }
    }
}

/// What the export was opened with.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    /// Pass TRIM down to the raw volume (punch holes). Off by default, as in dm-crypt: discards
    /// reveal which blocks are unused.
    pub allow_discards: bool,
}

/// The geometry of the data area on the raw volume.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub sector_size: SectorSize,
    pub data_offset: u64,
    pub data_size: u64,
}

/// A read planned by [`Export::plan_read`]: the aligned range of the data area to read and
/// decrypt, and where the requested bytes sit in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPlan {
    pub wide: ByteRange,
    /// Offset of the requested bytes in the buffer.
    pub skip: usize,
    /// Number of requested bytes.
    pub len: usize,
}

#[derive(Debug)]
pub struct Export {
    opts: ExportOptions,
    geometry: Geometry,
    backend: Arc<dyn Backend>,
    cipher: SectorCipher,
    locks: RangeLocks,
    /// See [`Export::io_align`].
    io_align: u64,
}

impl Export {
    pub fn new(opts: ExportOptions, geometry: Geometry, backend: Arc<dyn Backend>, cipher: SectorCipher) -> Self {
        // Both are powers of two no larger than 4096, so the larger is a multiple of both.
        let io_align = geometry.sector_size.bytes_u64().max(backend.alignment());
        Export { opts, geometry, backend, cipher, locks: RangeLocks::default(), io_align }
    }

    /// True if the raw volume is cache-backed (buffered), so reads of cached data and small
    /// writes can be done inline by the connection (see [`Export::try_write`]).
    pub fn cached(&self) -> bool {
        self.backend.cached_writes()
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    pub fn description(&self) -> &str {
        &self.opts.description
    }

    pub fn size(&self) -> u64 {
        self.geometry.data_size
    }

    pub fn sector_size(&self) -> SectorSize {
        self.geometry.sector_size
    }

    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn check_read(&self, offset: u64, len: u64) -> Result<ByteRange, ExportError> {
        let size = self.size();
        match ByteRange::new(offset, len) {
            Some(r) if r.fits_in(size) => Ok(r),
            _ => Err(ExportError::ReadOutOfRange { offset, len, size }),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<ByteRange, ExportError> {
        if self.opts.read_only {
            return Err(ExportError::ReadOnly);
        }
        let size = self.size();
        match ByteRange::new(offset, len) {
            Some(r) if r.fits_in(size) => Ok(r),
            _ => Err(ExportError::WriteOutOfRange { offset, len, size }),
        }
    }

    /// Raw-volume offset of a data-area offset. Cannot overflow: the header check at open
    /// guarantees `data_offset + data_size` fits in u64 and every range is within data_size.
    fn raw(&self, offset: u64) -> u64 {
        self.geometry.data_offset + offset
    }

    /// Alignment of every raw-volume I/O: the sector size, or the backend's `O_DIRECT`
    /// alignment when that is larger (a 512-byte-sector volume on a 4Kn disk).
    pub fn io_align(&self) -> u64 {
        self.io_align
    }

    /// The smallest `io_align`-aligned range covering `r`; `None` on overflow.
    fn widen(&self, r: ByteRange) -> Option<ByteRange> {
        let mask = self.io_align - 1;
        let start = r.offset & !mask;
        let end = r.end().checked_add(mask)? & !mask;
        Some(ByteRange { offset: start, len: end - start })
    }

    fn is_io_aligned(&self, r: ByteRange) -> bool {
        (r.offset | r.len) & (self.io_align - 1) == 0
    }

    /// Reads and decrypts the `io_align`-aligned range `wide` into `buf` (`wide.len` bytes).
    /// With `nowait`, only if the backend can do it without blocking: `Ok(false)` otherwise.
    fn read_raw(&self, wide: ByteRange, buf: &mut [u8], nowait: bool) -> Result<bool, ExportError> {
        if nowait {
            if !self.backend.try_read_at(buf, self.raw(wide.offset))? {
                return Ok(false);
            }
        } else {
            self.backend.read_at(buf, self.raw(wide.offset))?;
        }
        self.cipher.decrypt(self.sector_size().sector_of(wide.offset), buf)?;
        Ok(true)
    }

    /// Checks a read and plans it: which aligned range of the volume to read, and where the
    /// requested bytes sit in it. The caller provides a buffer of `plan.wide.len` bytes.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<ReadPlan, ExportError> {
        let r = self.check_read(offset, len)?;
        let wide = self.widen(r).ok_or(ExportError::ReadOutOfRange { offset, len, size: self.size() })?;
        // Both fit in usize: len <= MAX_REQUEST is checked by the caller, and widening adds
        // less than two io_align blocks.
        Ok(ReadPlan { wide, skip: (r.offset - wide.offset) as usize, len: r.len as usize })
    }

    /// Does a planned read into `buf` (exactly `plan.wide.len` bytes; the plaintext then sits
    /// at `buf[plan.skip..plan.skip + plan.len]`). With `nowait`, returns `Ok(false)` instead
    /// of waiting for the device (the data is not cached); `buf` is then unspecified.
    pub fn read_planned(&self, plan: &ReadPlan, buf: &mut [u8], nowait: bool) -> Result<bool, ExportError> {
        if plan.len == 0 {
            return Ok(true);
        }
        self.read_raw(plan.wide, buf, nowait)
    }

    /// Reads `buf.len()` plaintext bytes at `offset` (a convenience over [`Export::plan_read`]
    /// that copies when the request is not aligned).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let plan = self.plan_read(offset, buf.len() as u64)?;
        if plan.len == 0 {
            return Ok(());
        }
        if plan.skip == 0 && plan.wide.len == buf.len() as u64 {
            self.read_raw(plan.wide, buf, false)?;
            return Ok(());
        }
        let mut tmp = AlignedBuf::zeroed(plan.wide.len as usize);
        self.read_raw(plan.wide, &mut tmp, false)?;
        buf.copy_from_slice(&tmp[plan.skip..plan.skip + plan.len]);
        Ok(())
    }

    /// Checks a read request without doing it (NBD_CMD_CACHE, and validation before the
    /// payload buffer is allocated).
    pub fn validate_read(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check_read(offset, len).map(|_| ())
    }

    /// Encrypts and writes `data` at `offset`. `data` is the scratch buffer: when the request
    /// is aligned it is encrypted in place (no copy, no allocation), so on return it holds
    /// ciphertext or garbage, never the plaintext.
    pub fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), ExportError> {
        let r = self.check_write(offset, data.len() as u64)?;
        if r.len == 0 {
            return self.maybe_fua(fua);
        }
        let wide = self.widen(r).ok_or(ExportError::WriteOutOfRange { offset, len: r.len, size: self.size() })?;
        let guard = self.locks.lock(wide);
        self.write_locked(r, wide, data, &guard)?;
        drop(guard);
        self.maybe_fua(fua)
    }

    /// The inline fast path of [`Export::write`], for a caller that must not block (an async
    /// task): does the write only if it needs neither the device nor a wait — an aligned,
    /// page-sized write, no FUA, into a cache-backed volume, whose range no other write holds.
    /// `Ok(false)` leaves `data` untouched: call [`Export::write`] on a blocking thread.
    pub fn try_write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<bool, ExportError> {
        let r = self.check_write(offset, data.len() as u64)?;
        // Page alignment: a partial-page buffered write may have to read the page first.
        if fua || !self.backend.cached_writes() || (r.offset | r.len) % PAGE != 0 || !self.is_io_aligned(r) {
            return Ok(false);
        }
        let Some(guard) = self.locks.try_lock(r) else { return Ok(false) };
        self.write_locked(r, r, data, &guard)?;
        Ok(true)
    }

    /// The write itself, under the range lock on `wide` (the io-aligned cover of `r`).
    fn write_locked(
        &self,
        r: ByteRange,
        wide: ByteRange,
        data: &mut [u8],
        _lock: &RangeGuard<'_>,
    ) -> Result<(), ExportError> {
        let ss = self.sector_size();
        if r == wide {
            self.cipher.encrypt(ss.sector_of(r.offset), data)?;
            self.backend.write_at(data, self.raw(r.offset))?;
        } else {
            let mut buf = self.read_modify(r, wide, |dst| dst.copy_from_slice(data))?;
            self.cipher.encrypt(ss.sector_of(wide.offset), &mut buf)?;
            self.backend.write_at(&buf, self.raw(wide.offset))?;
        }
        Ok(())
    }

    /// Builds the plaintext of the widened range: the partial head and tail blocks read and
    /// decrypted from disk, the middle filled by `fill`. Caller holds the range lock.
    fn read_modify(
        &self,
        r: ByteRange,
        wide: ByteRange,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<AlignedBuf, ExportError> {
        let s = self.io_align as usize;
        let mut buf = AlignedBuf::zeroed(wide.len as usize);
        let head = (r.offset - wide.offset) as usize;
        let tail_end = head + r.len as usize;
        if head != 0 {
            self.read_raw(ByteRange { offset: wide.offset, len: s as u64 }, &mut buf[..s], false)?;
        }
        let last = buf.len() - s;
        // The tail block needs reading if the range ends inside it, unless it is the head
        // block already read above.
        if tail_end % s != 0 && (last != 0 || head == 0) {
            let off = wide.offset + last as u64;
            self.read_raw(ByteRange { offset: off, len: s as u64 }, &mut buf[last..], false)?;
        }
        fill(&mut buf[head..tail_end]);
        Ok(buf)
    }

    /// Makes `len` bytes at `offset` read back as zeros. Zero ciphertext is not zero
    /// plaintext, so zeros are encrypted and written like any data.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool, fast_only: bool) -> Result<(), ExportError> {
        let r = self.check_write(offset, len)?;
        if fast_only {
            // Every zero is written as ciphertext: never faster than a write.
            return Err(ExportError::NotSupported("fast zero"));
        }
        if r.len == 0 {
            return self.maybe_fua(fua);
        }
        let ss = self.sector_size();
        let wide = self.widen(r).ok_or(ExportError::WriteOutOfRange { offset, len, size: self.size() })?;
        let _guard = self.locks.lock(wide);
        // Partial head/tail blocks: read-modify-write one io_align block each.
        let s = self.io_align;
        let align_down = |x: u64| x & !(s - 1);
        let mut mid_start = r.offset;
        let mut mid_end = r.end();
        if r.offset % s != 0 {
            let block = ByteRange { offset: align_down(r.offset), len: s };
            let upto = r.end().min(block.end());
            self.zero_partial(ByteRange { offset: r.offset, len: upto - r.offset }, block)?;
            mid_start = block.end().min(r.end());
        }
        if mid_start < mid_end && mid_end % s != 0 {
            let block = ByteRange { offset: align_down(mid_end), len: s };
            let from = mid_start.max(block.offset);
            self.zero_partial(ByteRange { offset: from, len: mid_end - from }, block)?;
            mid_end = block.offset.max(mid_start);
        }
        let mut pos = mid_start;
        if pos < mid_end {
            let chunk = ZERO_CHUNK.min((mid_end - pos) as usize);
            let mut buf = AlignedBuf::zeroed(chunk);
            while pos < mid_end {
                let n = chunk.min((mid_end - pos) as usize);
                buf[..n].fill(0);
                self.cipher.encrypt(ss.sector_of(pos), &mut buf[..n])?;
                self.backend.write_at(&buf[..n], self.raw(pos))?;
                pos += n as u64;
            }
        }
        self.maybe_fua(fua)
    }

    fn zero_partial(&self, part: ByteRange, block: ByteRange) -> Result<(), ExportError> {
        let mut buf = self.read_modify(part, block, |dst| dst.fill(0))?;
        self.cipher.encrypt(self.sector_size().sector_of(block.offset), &mut buf)?;
        self.backend.write_at(&buf, self.raw(block.offset))?;
        Ok(())
    }

    /// Discards whole sectors inside the range when discards are allowed; otherwise (and for
    /// partial sectors) does nothing, which the spec permits: trimmed data reads back as
    /// unspecified contents.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        let r = self.check_write(offset, len)?;
        if self.opts.allow_discards && r.len > 0 {
            let mask = self.io_align - 1;
            if let Some(start) = r.offset.checked_add(mask).map(|x| x & !mask) {
                let end = r.end() & !mask;
                if end > start {
                    let inner = ByteRange { offset: start, len: end - start };
                    let _guard = self.locks.lock(inner);
                    match self.backend.discard(self.raw(start), inner.len) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        self.maybe_fua(fua)
    }

    /// Makes every write completed so far durable, for every connection (the raw volume is
    /// shared, so one fdatasync covers all: this is what makes CAN_MULTI_CONN honest).
    pub fn flush(&self) -> Result<(), ExportError> {
        self.backend.flush().map_err(ExportError::from)
    }

    fn maybe_fua(&self, fua: bool) -> Result<(), ExportError> {
        if fua {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Whether TRIM is worth advertising (it is always accepted; see [`Export::trim`]).
    pub fn discards_allowed(&self) -> bool {
        self.opts.allow_discards
    }

    /// First sector index of the data area (always 0: the tweak counts from the data area).
    pub fn first_sector(&self) -> SectorIndex {
        SectorIndex(0)
    }
}

/// Exclusive locks on byte ranges, for writers. A short critical section scans the (small)
/// list of held ranges; a writer whose range overlaps one waits on the condvar. Releasing
/// wakes waiters only if there are any (an uncontended lock costs two mutex round trips, no
/// system call).
#[derive(Debug, Default)]
struct RangeLocks {
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    ranges: Vec<(u64, u64)>,
    waiters: usize,
}

impl Held {
    fn overlaps(&self, (start, end): (u64, u64)) -> bool {
        self.ranges.iter().any(|&(s, e)| s < end && start < e)
    }
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    fn lock(&self, r: ByteRange) -> RangeGuard<'_> {
        let range = (r.offset, r.end());
        // A poisoned lock only means another writer panicked; the list is still consistent.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.overlaps(range) {
            held.waiters += 1;
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
            held.waiters -= 1;
        }
        held.ranges.push(range);
        RangeGuard { locks: self, range }
    }

    /// The lock, if no other writer holds an overlapping range.
    fn try_lock(&self, r: ByteRange) -> Option<RangeGuard<'_>> {
        let range = (r.offset, r.end());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.overlaps(range) {
            return None;
        }
        held.ranges.push(range);
        Some(RangeGuard { locks: self, range })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.ranges.iter().position(|&r| r == self.range) {
            held.ranges.swap_remove(i);
        }
        let waiters = held.waiters;
        drop(held);
        if waiters > 0 {
            self.locks.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::crypto::VolumeKey;

    const DATA_OFFSET: u64 = 8192;

    fn export(ss: SectorSize, sectors: u64) -> (Export, Arc<MemBackend>) {
        let size = sectors * ss.bytes_u64();
        let mem = Arc::new(MemBackend::new((DATA_OFFSET + size) as usize));
        let key = VolumeKey::generate().unwrap();
        let cipher = SectorCipher::new(&key, ss).unwrap();
        let opts =
            ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: true };
        let geo = Geometry { sector_size: ss, data_offset: DATA_OFFSET, data_size: size };
        (Export::new(opts, geo, mem.clone(), cipher), mem)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn aligned_write_reads_back() {
        let (e, _) = export(SectorSize::S4096, 8);
        e.write(4096, &mut pattern(8192, 1), false).unwrap();
        let mut out = vec![0u8; 8192];
        e.read(4096, &mut out).unwrap();
        assert_eq!(out, pattern(8192, 1));
    }

    #[test]
    fn raw_volume_holds_ciphertext_only() {
        let (e, mem) = export(SectorSize::S512, 16);
        let plain = vec![0x42u8; 4096];
        e.write(0, &mut plain.clone(), false).unwrap();
        let raw = mem.snapshot();
        let area = &raw[DATA_OFFSET as usize..DATA_OFFSET as usize + 4096];
        assert_ne!(area, &plain[..]);
        assert!(!raw.windows(16).any(|w| w == [0x42u8; 16]));
    }

    #[test]
    fn unaligned_write_preserves_neighbours() {
        let (e, _) = export(SectorSize::S4096, 4);
        e.write(0, &mut pattern(16384, 7), false).unwrap();
        e.write(1000, &mut vec![0xEE; 5000], false).unwrap();
        let mut out = vec![0u8; 16384];
        e.read(0, &mut out).unwrap();
        let mut want = pattern(16384, 7);
        want[1000..6000].fill(0xEE);
        assert_eq!(out, want);
    }

    #[test]
    fn unaligned_write_inside_one_sector() {
        let (e, _) = export(SectorSize::S4096, 2);
        e.write(0, &mut pattern(8192, 3), false).unwrap();
        e.write(4100, &mut [1, 2, 3], false).unwrap();
        let mut out = vec![0u8; 8192];
        e.read(0, &mut out).unwrap();
        let mut want = pattern(8192, 3);
        want[4100..4103].copy_from_slice(&[1, 2, 3]);
        assert_eq!(out, want);
    }

    #[test]
    fn unaligned_read_returns_the_exact_bytes() {
        let (e, _) = export(SectorSize::S4096, 2);
        e.write(0, &mut pattern(8192, 9), false).unwrap();
        let mut out = vec![0u8; 10];
        e.read(4090, &mut out).unwrap();
        assert_eq!(out, pattern(8192, 9)[4090..4100]);
    }

    #[test]
    fn write_zeroes_reads_back_as_zeros() {
        for (off, len) in [(0u64, 16384u64), (100, 9000), (4096, 4096), (5000, 10), (1, 16382)] {
            let (e, _) = export(SectorSize::S4096, 4);
            e.write(0, &mut pattern(16384, 5), false).unwrap();
            e.write_zeroes(off, len, false, false).unwrap();
            let mut out = vec![0u8; 16384];
            e.read(0, &mut out).unwrap();
            let mut want = pattern(16384, 5);
            want[off as usize..(off + len) as usize].fill(0);
            assert_eq!(out, want, "zero {off}+{len}");
        }
    }

    #[test]
    fn fast_zero_is_refused() {
        let (e, _) = export(SectorSize::S4096, 2);
        let err = e.write_zeroes(0, 4096, false, true).unwrap_err();
        assert_eq!(err.errno(), proto::ENOTSUP);
    }

    #[test]
    fn out_of_range_errnos_follow_the_spec() {
        let (e, _) = export(SectorSize::S512, 4);
        let mut buf = vec![0u8; 512];
        assert_eq!(e.read(2048, &mut buf).unwrap_err().errno(), proto::EINVAL);
        assert_eq!(e.write(2048, &mut vec![0; 512], false).unwrap_err().errno(), proto::ENOSPC);
        assert_eq!(e.write_zeroes(u64::MAX, 2, false, false).unwrap_err().errno(), proto::ENOSPC);
        assert_eq!(e.validate_read(u64::MAX, 1).unwrap_err().errno(), proto::EINVAL);
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mem = Arc::new(MemBackend::new(1 << 16));
        let key = VolumeKey::generate().unwrap();
        let opts =
            ExportOptions { name: "r".into(), description: String::new(), read_only: true, allow_discards: false };
        let geo = Geometry { sector_size: SectorSize::S512, data_offset: 0, data_size: 1 << 16 };
        let e = Export::new(opts, geo, mem, SectorCipher::new(&key, SectorSize::S512).unwrap());
        assert_eq!(e.write(0, &mut vec![0; 512], false).unwrap_err().errno(), proto::EPERM);
    }

    #[test]
    fn fua_flushes() {
        let (e, mem) = export(SectorSize::S512, 4);
        e.write(0, &mut vec![1; 512], true).unwrap();
        assert_eq!(mem.flush_count(), 1);
    }

    #[test]
    fn concurrent_sub_sector_writes_to_one_sector_all_land() {
        let (e, _) = export(SectorSize::S4096, 1);
        let e = Arc::new(e);
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for round in 0..50u8 {
                        e.write(u64::from(i) * 512, &mut vec![i ^ round; 512], false).unwrap();
                    }
                    e.write(u64::from(i) * 512, &mut vec![i + 1; 512], false).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut out = vec![0u8; 4096];
        e.read(0, &mut out).unwrap();
        for i in 0..8 {
            assert!(out[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8 + 1), "slice {i}");
        }
    }
}
