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
//!
//! The sector cipher sits behind a [`CipherGate`]: `nbdcrypt suspend` drops it (the key
//! schedules are freed) and cipher calls wait until `resume` gives a new one; the I/O paths
//! below do not change. The export also carries its [`ExportMetrics`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::backend::Backend;
use crate::buf::AlignedBuf;
use crate::crypto::{CipherError, CipherGate, GateError, GateState, SectorCipher};
use crate::errno;
use crate::metrics::{ExportMetrics, Fault};
use crate::units::{ByteRange, SectorIndex, SectorSize};

mod backpressure;
mod range_lock;

use backpressure::Backpressure;
use range_lock::{RangeGuard, RangeLocks};

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
    /// A write or zero request reaches past the end of the export.
    #[error("write of {len} bytes at offset {offset} is past the end of the export ({size} bytes)")]
    WriteOutOfRange { offset: u64, len: u64, size: u64 },
    /// A trim request reaches past the end of the export (the spec wants EINVAL, as reads).
    #[error("trim of {len} bytes at offset {offset} is past the end of the export ({size} bytes)")]
    TrimOutOfRange { offset: u64, len: u64, size: u64 },
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
    /// The export was suspended and the server shut down before it was resumed.
    #[error("the export is suspended and the server is shutting down")]
    ShuttingDown,
    /// An earlier flush failed, so writes acknowledged before it may never reach the raw
    /// volume, and no later flush can vouch for them (see [`Export::flush`]).
    #[error("an earlier flush of the raw volume failed; writes may have been lost (restart to clear)")]
    FlushFailedEarlier,
}

impl ExportError {
    /// Whether the raw volume (or the cipher) failed, as opposed to a request refused for
    /// what it asked. These are the errors [`Export::io_errors`] counts.
    pub fn is_io(&self) -> bool {
        match self {
            ExportError::NoSpace(_) | ExportError::Io(_) | ExportError::Cipher(_) | ExportError::FlushFailedEarlier => {
                true
            }
            ExportError::ReadOutOfRange { .. }
            | ExportError::WriteOutOfRange { .. }
            | ExportError::TrimOutOfRange { .. }
            | ExportError::ReadOnly
            | ExportError::TooLarge { .. }
            | ExportError::NotSupported(_)
            | ExportError::ShuttingDown => false,
        }
    }

    /// The NBD error code for the reply. Exhaustive on purpose: a new variant must pick one.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::ReadOutOfRange { .. } => errno::EINVAL,
            ExportError::WriteOutOfRange { .. } => errno::ENOSPC,
            ExportError::TrimOutOfRange { .. } => errno::EINVAL,
            ExportError::ReadOnly => errno::EPERM,
            ExportError::TooLarge { .. } => errno::EINVAL,
            ExportError::NotSupported(_) => errno::ENOTSUP,
            ExportError::NoSpace(_) => errno::ENOSPC,
            ExportError::Io(_) => errno::EIO,
            ExportError::Cipher(_) => errno::EIO,
            ExportError::ShuttingDown => errno::ESHUTDOWN,
            ExportError::FlushFailedEarlier => errno::EIO,
        }
    }

    /// Whose fault the failure is, for logging: a client's bad request is logged at debug, the
    /// server's failures also at warn (rate-limited). Exhaustive, like [`ExportError::errno`].
    pub fn fault(&self) -> Fault {
        match self {
            ExportError::ReadOutOfRange { .. }
            | ExportError::WriteOutOfRange { .. }
            | ExportError::TrimOutOfRange { .. }
            | ExportError::ReadOnly
            | ExportError::TooLarge { .. }
            | ExportError::NotSupported(_) => Fault::Client,
            ExportError::NoSpace(_)
            | ExportError::Io(_)
            | ExportError::Cipher(_)
            | ExportError::ShuttingDown
            | ExportError::FlushFailedEarlier => Fault::Server,
        }
    }
}

impl From<GateError> for ExportError {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Closed => ExportError::ShuttingDown,
            GateError::Cipher(c) => ExportError::Cipher(c),
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
    cipher: CipherGate,
    locks: RangeLocks,
    /// See [`Export::io_align`].
    io_align: u64,
    metrics: ExportMetrics,
    /// Requests that failed on the raw volume (see [`ExportError::is_io`]).
    io_errors: AtomicU64,
    /// Flushes of the raw volume: one at a time, shared by the requests waiting for them,
    /// and the record of a failure (see [`Export::flush`]).
    flushes: FlushGate,
    /// Whether the raw volume is holding writes up, so they stay off the connection threads.
    backpressure: Backpressure,
}

impl Export {
    pub fn new(opts: ExportOptions, geometry: Geometry, backend: Arc<dyn Backend>, cipher: SectorCipher) -> Self {
        // Both are powers of two no larger than 4096, so the larger is a multiple of both.
        let io_align = geometry.sector_size.bytes_u64().max(backend.alignment());
        let metrics = ExportMetrics::default();
        metrics.set_unlocked(Some(std::time::SystemTime::now()));
        Export {
            opts,
            geometry,
            backend,
            cipher: CipherGate::new(cipher),
            locks: RangeLocks::default(),
            io_align,
            metrics,
            io_errors: AtomicU64::new(0),
            flushes: FlushGate::default(),
            backpressure: Backpressure::default(),
        }
    }

    /// True if the raw volume is cache-backed (buffered), so reads of cached data and small
    /// writes can be done inline by the connection (see [`Export::try_write`]).
    pub fn cached(&self) -> bool {
        self.backend.cached_writes()
    }
    pub fn metrics(&self) -> &ExportMetrics {
        &self.metrics
    }

    /// The raw volume (for re-reading the header on resume).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Drops the sector cipher, so no key schedule of this volume is left in memory, then
    /// flushes. Requests that need the cipher wait until [`Export::resume`]. The cipher goes
    /// first so that a failing flush cannot leave the key in memory; the flush still covers
    /// every write acknowledged before the suspend. Returns `Ok(false)` if already suspended.
    /// Blocking: call it off the async runtime.
    pub fn suspend(&self) -> Result<bool, ExportError> {
        let suspended = self.cipher.suspend();
        if suspended {
            self.metrics.set_unlocked(None);
        }
        self.flush()?;
        Ok(suspended)
    }

    /// Gives a suspended export its cipher back (built from a key that was unlocked again and
    /// checked against this volume) and releases the waiting requests. False if not suspended.
    pub fn resume(&self, cipher: SectorCipher) -> bool {
        let resumed = self.cipher.resume(cipher);
        if resumed {
            self.metrics.set_unlocked(Some(std::time::SystemTime::now()));
        }
        resumed
    }

    /// At shutdown: requests waiting on a suspended export fail with `ESHUTDOWN` instead of
    /// holding up the drain.
    pub fn close(&self) {
        self.cipher.close();
    }

    pub fn state(&self) -> GateState {
        self.cipher.state()
    }

    /// The sector cipher's engine; `None` while suspended.
    pub fn cipher_engine(&self) -> Option<crate::crypto::CipherEngine> {
        self.cipher.engine()
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

    /// Requests answered with an error because the raw volume failed, since the export opened.
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }

    /// Counts a failed request; called where the reply status is decided.
    pub fn record_error(&self, e: &ExportError) {
        if e.is_io() {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        }
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
    /// With `nowait`, only if neither the backend nor a suspended cipher makes it wait:
    /// `Ok(false)` otherwise.
    fn read_raw(&self, wide: ByteRange, buf: &mut [u8], nowait: bool) -> Result<bool, ExportError> {
        let first = self.sector_size().sector_of(wide.offset);
        let raw = self.raw(wide.offset);
        // Straight from the page cache when the range is cached in the volume's mapping: one
        // pass over the data. (A page evicted since the check faults in on this thread, even
        // with `nowait`: rare, it was cached a moment ago.) A suspended cipher leaves
        // `decrypted` empty; the paths below then decline (`nowait`) or wait for it.
        let mut decrypted = None;
        let mapped = self.backend.read_mapped(raw, buf.len(), &mut |src| {
            decrypted = match nowait {
                true => self.cipher.try_decrypt_mapped(first, src, buf),
                false => Some(self.cipher.decrypt_mapped(first, src, buf)),
            };
        });
        if let (Some(()), Some(r)) = (mapped, decrypted) {
            r?;
            return Ok(true);
        }
        if !nowait {
            self.backend.read_at(buf, raw)?;
            self.cipher.decrypt(first, buf)?;
            return Ok(true);
        }
        if !self.backend.try_read_at(buf, raw)? {
            return Ok(false);
        }
        match self.cipher.try_decrypt(first, buf) {
            Some(r) => r.map(|()| true).map_err(ExportError::from),
            None => Ok(false),
        }
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
        self.write_locked(r, wide, data, &guard, false)?;
        drop(guard);
        self.maybe_fua(fua)
    }

    /// The inline fast path of [`Export::write`], for a caller that must not block (an async
    /// task): does the write only if it needs neither the device nor a wait — an aligned,
    /// page-sized write, no FUA, into a cache-backed volume that is not holding writes up
    /// (see `export::backpressure`), whose range no other write holds, with the cipher not
    /// suspended. `Ok(false)` leaves `data` untouched: call [`Export::write`] on a blocking
    /// thread.
    pub fn try_write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<bool, ExportError> {
        let r = self.check_write(offset, data.len() as u64)?;
        // Page alignment: a partial-page buffered write may have to read the page first.
        if fua
            || !self.backend.cached_writes()
            || (r.offset | r.len) % PAGE != 0
            || !self.is_io_aligned(r)
            || !self.backpressure.inline_ok()
        {
            return Ok(false);
        }
        let Some(guard) = self.locks.try_lock(r) else { return Ok(false) };
        self.write_locked(r, r, data, &guard, true)
    }

    /// The write itself, under the range lock on `wide` (the io-aligned cover of `r`). With
    /// `nowait` (aligned writes only), `Ok(false)` and `data` untouched if the cipher is
    /// suspended.
    fn write_locked(
        &self,
        r: ByteRange,
        wide: ByteRange,
        data: &mut [u8],
        _lock: &RangeGuard<'_>,
        nowait: bool,
    ) -> Result<bool, ExportError> {
        let ss = self.sector_size();
        if r == wide {
            if nowait {
                match self.cipher.try_encrypt(ss.sector_of(r.offset), data) {
                    Some(res) => res?,
                    None => return Ok(false),
                }
            } else {
                self.cipher.encrypt(ss.sector_of(r.offset), data)?;
            }
            self.timed_write(data, r.offset)?;
        } else {
            let mut buf = self.read_modify(r, wide, |dst| dst.copy_from_slice(data))?;
            self.cipher.encrypt(ss.sector_of(wide.offset), &mut buf)?;
            self.timed_write(&buf, wide.offset)?;
        }
        Ok(true)
    }

    /// Writes ciphertext at data-area `offset`, timing it (see [`backpressure`]).
    fn timed_write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let (r, slow) = self.backpressure.timed(data.len(), || self.backend.write_at(data, self.raw(offset)));
        if let Some(started) = slow {
            self.metrics.slow_write();
            if started {
                tracing::debug!(
                    export = %self.opts.name,
                    len = data.len(),
                    "the raw volume held a write up (it is behind): writes go to the blocking pool for {} s",
                    backpressure::HOLD.as_secs()
                );
            }
        }
        r
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
        if !tail_end.is_multiple_of(s) && (last != 0 || head == 0) {
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
        let r = self.check_write(offset, len).map_err(|e| match e {
            ExportError::WriteOutOfRange { offset, len, size } => ExportError::TrimOutOfRange { offset, len, size },
            other => other,
        })?;
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
    ///
    /// Once a flush has failed, every later flush fails too, until the export is reopened.
    /// After fdatasync reports a writeback error, Linux marks the failed pages clean (their
    /// data is lost) and reports the error once: the next fdatasync succeeds although the
    /// writes acknowledged before the failure never reached the disk, so a later FLUSH would
    /// vouch for lost data. QEMU's file driver does the same (`page_cache_inconsistent`);
    /// PostgreSQL panics ("fsyncgate").
    ///
    /// Flushes of the raw volume run one at a time: of two concurrent fdatasync calls only
    /// one reports the error, and the other may return success before the failure is known
    /// here. Requests do not queue one fdatasync each, though (group commit): a request is
    /// answered by the first flush that *starts* after it arrived, so every request waiting
    /// while a flush runs shares the next one.
    pub fn flush(&self) -> Result<(), ExportError> {
        let gate = &self.flushes;
        // A poisoned lock only means a thread panicked while holding it; the counters are
        // only ever updated whole.
        let mut st = gate.state.lock().unwrap_or_else(|p| p.into_inner());
        let needed = st.started + 1;
        loop {
            if st.failed {
                return Err(ExportError::FlushFailedEarlier);
            }
            if st.finished >= needed {
                return Ok(());
            }
            if st.running {
                st = gate.finished.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.running = true;
            st.started += 1;
            let this = st.started;
            drop(st);
            let result = self.backend.flush();
            st = gate.state.lock().unwrap_or_else(|p| p.into_inner());
            st.running = false;
            st.finished = this;
            if let Err(e) = result {
                st.failed = true;
                drop(st);
                gate.finished.notify_all();
                tracing::error!(export = %self.opts.name, error = %e, "flush of the raw volume failed: writes may be lost; every later flush will fail until restart");
                return Err(ExportError::from(e));
            }
            gate.finished.notify_all();
        }
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

/// The state of [`Export::flush`]: flushes are numbered as they start.
#[derive(Debug, Default)]
struct FlushGate {
    state: Mutex<FlushState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// A flush of the raw volume is running (it is number `started`).
    running: bool,
    /// Flushes started so far.
    started: u64,
    /// The number of the last flush that finished.
    finished: u64,
    /// A flush has failed: no later flush may succeed.
    failed: bool,
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

    /// A writable export with 512-byte sectors whose data area is all of `backend` (a fault
    /// backend, so a test can fail its writes and flushes or cut its power).
    fn fault_export(backend: Arc<crate::backend::fault::FaultBackend>, key: &VolumeKey) -> Export {
        let opts =
            ExportOptions { name: "f".into(), description: String::new(), read_only: false, allow_discards: false };
        let geo = Geometry { sector_size: SectorSize::S512, data_offset: 0, data_size: backend.size() };
        Export::new(opts, geo, backend, SectorCipher::new(key, SectorSize::S512).unwrap())
    }

    #[test]
    fn aligned_write_reads_back() {
        let (e, _) = export(SectorSize::S4096, 8);
        e.write(4096, &mut pattern(8192, 1), false).unwrap();
        let mut out = vec![0u8; 8192];
        e.read(4096, &mut out).unwrap();
        assert_eq!(out, pattern(8192, 1));
    }

    /// A cached volume whose writes take `delay_ms` each, as when the kernel throttles a
    /// writer whose device is behind.
    #[derive(Debug)]
    struct SlowWrites {
        mem: MemBackend,
        delay_ms: AtomicU64,
    }

    impl Backend for SlowWrites {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms.load(Ordering::Relaxed)));
            self.mem.write_at(buf, offset)
        }
        fn cached_writes(&self) -> bool {
            true
        }
        fn flush(&self) -> io::Result<()> {
            self.mem.flush()
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    #[test]
    fn writes_the_volume_holds_up_move_off_the_inline_path() {
        let slow = Arc::new(SlowWrites { mem: MemBackend::new(64 << 10), delay_ms: AtomicU64::new(0) });
        let opts =
            ExportOptions { name: "s".into(), description: String::new(), read_only: false, allow_discards: false };
        let geo = Geometry { sector_size: SectorSize::S4096, data_offset: 0, data_size: 64 << 10 };
        let key = VolumeKey::generate().unwrap();
        let e = Export::new(opts, geo, slow.clone(), SectorCipher::new(&key, SectorSize::S4096).unwrap());
        assert!(e.try_write(0, &mut pattern(4096, 1), false).unwrap(), "inline while writes are fast");
        slow.delay_ms.store(backpressure::slow_limit(4096).as_millis() as u64 + 5, Ordering::Relaxed);
        e.write(4096, &mut pattern(4096, 2), false).unwrap();
        slow.delay_ms.store(0, Ordering::Relaxed);
        let mut data = pattern(4096, 3);
        assert!(!e.try_write(8192, &mut data, false).unwrap(), "declined after a held-up write");
        assert_eq!(data, pattern(4096, 3), "a declined write leaves the plaintext untouched");
        e.write(8192, &mut data, false).unwrap();
        let mut out = vec![0u8; 3 * 4096];
        e.read(0, &mut out).unwrap();
        assert_eq!(out, [pattern(4096, 1), pattern(4096, 2), pattern(4096, 3)].concat());
        let text = crate::metrics::encode(
            &[crate::metrics::ExportView { name: "s", metrics: e.metrics(), size: e.size(), suspended: false }],
            crate::metrics::ProcessView { start_time: std::time::SystemTime::now() },
        );
        assert!(text.contains("nbdcrypt_slow_writes_total{export=\"s\"} 1\n"), "{text}");
    }

    /// An export of a temporary file holding `size` data bytes, buffered (so mapped); with
    /// the file, its backend and the volume key.
    fn file_export(
        ss: SectorSize,
        size: u64,
    ) -> (Export, Arc<crate::backend::FileBackend>, tempfile::NamedTempFile, VolumeKey) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(DATA_OFFSET + size).unwrap();
        let file = Arc::new(crate::backend::FileBackend::open(f.path(), true).unwrap());
        let key = VolumeKey::generate().unwrap();
        let opts =
            ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: true };
        let geo = Geometry { sector_size: ss, data_offset: DATA_OFFSET, data_size: size };
        let e = Export::new(opts, geo, file.clone(), SectorCipher::new(&key, ss).unwrap());
        (e, file, f, key)
    }

    #[test]
    fn file_volume_reads_through_its_mapping_and_survives_shrinking() {
        let size = 64 * 4096u64;
        let (e, file, f, _key) = file_export(SectorSize::S4096, size);
        let data = pattern(size as usize, 3);
        e.write(0, &mut data.clone(), false).unwrap();
        // `read` takes the blocking path: decrypted from the mapping.
        assert!(file.read_mapped(DATA_OFFSET, 4096, &mut |_| {}).is_some());
        let mut out = vec![0u8; size as usize];
        e.read(0, &mut out).unwrap();
        assert_eq!(out, data);
        // The volume shrinks under the server: the lost range fails with an I/O error (from
        // pread, whether or not the mapping faulted first); the rest still reads.
        f.as_file().set_len(DATA_OFFSET + size / 2).unwrap();
        let mut tail = vec![0u8; 4096];
        assert!(e.read(size - 4096, &mut tail).unwrap_err().is_io());
        let mut head = vec![0u8; 4096];
        e.read(0, &mut head).unwrap();
        assert_eq!(head, data[..4096]);
    }

    #[test]
    fn file_volume_serves_cached_reads_without_waiting_through_its_mapping() {
        let ss = SectorSize::S512;
        let size = 64 * 4096u64;
        let (e, file, _f, key) = file_export(ss, size);
        let data = pattern(size as usize, 5);
        e.write(0, &mut data.clone(), false).unwrap();
        assert!(file.read_mapped(DATA_OFFSET + 1536, 8192, &mut |_| {}).is_some(), "cached and mapped");
        // Unaligned, several sectors: decrypted straight from the mapping, on this thread.
        let plan = e.plan_read(1000, 9000).unwrap();
        let mut buf = vec![0u8; plan.wide.len as usize];
        assert!(e.read_planned(&plan, &mut buf, true).unwrap());
        assert_eq!(buf[plan.skip..plan.skip + plan.len], data[1000..10_000]);
        // A suspended cipher makes the non-waiting read decline, not block.
        assert!(e.suspend().unwrap());
        assert!(!e.read_planned(&plan, &mut buf, true).unwrap());
        assert!(e.resume(SectorCipher::new(&key, ss).unwrap()));
        assert!(e.read_planned(&plan, &mut buf, true).unwrap());
        assert_eq!(buf[plan.skip..plan.skip + plan.len], data[1000..10_000]);
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
        assert_eq!(err.errno(), errno::ENOTSUP);
    }

    #[test]
    fn out_of_range_errnos_follow_the_spec() {
        let (e, _) = export(SectorSize::S512, 4);
        let mut buf = vec![0u8; 512];
        assert_eq!(e.read(2048, &mut buf).unwrap_err().errno(), errno::EINVAL);
        assert_eq!(e.write(2048, &mut vec![0; 512], false).unwrap_err().errno(), errno::ENOSPC);
        assert_eq!(e.write_zeroes(u64::MAX, 2, false, false).unwrap_err().errno(), errno::ENOSPC);
        assert_eq!(e.validate_read(u64::MAX, 1).unwrap_err().errno(), errno::EINVAL);
        assert_eq!(e.trim(2048, 512, false).unwrap_err().errno(), errno::EINVAL);
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mem = Arc::new(MemBackend::new(1 << 16));
        let key = VolumeKey::generate().unwrap();
        let opts =
            ExportOptions { name: "r".into(), description: String::new(), read_only: true, allow_discards: false };
        let geo = Geometry { sector_size: SectorSize::S512, data_offset: 0, data_size: 1 << 16 };
        let e = Export::new(opts, geo, mem, SectorCipher::new(&key, SectorSize::S512).unwrap());
        assert_eq!(e.write(0, &mut vec![0; 512], false).unwrap_err().errno(), errno::EPERM);
    }

    #[test]
    fn only_raw_volume_failures_are_counted() {
        use crate::backend::fault::{FaultBackend, FaultPlan};
        let fault = Arc::new(FaultBackend::new(vec![0u8; 16384], 512, 1));
        let e = fault_export(fault.clone(), &VolumeKey::generate().unwrap());
        fault.set_faults(FaultPlan { write_eio: 1_000_000, ..Default::default() });
        let io = e.write(0, &mut vec![1; 512], false).unwrap_err();
        let range = e.write(1 << 20, &mut vec![1; 512], false).unwrap_err();
        e.record_error(&io);
        e.record_error(&range);
        assert_eq!((io.errno(), range.errno()), (errno::EIO, errno::ENOSPC));
        assert_eq!(e.io_errors(), 1);
    }

    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        use crate::backend::fault::{FaultBackend, FaultPlan};
        let fault = Arc::new(FaultBackend::new(vec![0u8; 16384], 512, 1));
        let e = fault_export(fault.clone(), &VolumeKey::generate().unwrap());
        e.write(0, &mut vec![1; 512], false).unwrap();
        fault.set_faults(FaultPlan { flush_eio: 1_000_000, ..Default::default() });
        assert_eq!(e.flush().unwrap_err().errno(), errno::EIO);
        // The disk works again, but the write above was lost with the failed flush.
        fault.set_faults(FaultPlan::default());
        assert!(matches!(e.flush(), Err(ExportError::FlushFailedEarlier)));
        assert_eq!(e.write(512, &mut vec![2; 512], true).unwrap_err().errno(), errno::EIO, "FUA flushes too");
        assert!(fault.durable_image()[..512].iter().all(|&b| b == 0));
    }

    /// Flushes racing with a flush that fails: none may succeed over writes the failure lost
    /// (a concurrent fdatasync can return 0 after another consumed the writeback error).
    #[test]
    fn no_flush_succeeds_over_writes_lost_by_a_concurrent_failed_flush() {
        use crate::backend::fault::{CutMode, FaultBackend, FaultPlan};
        use std::sync::atomic::AtomicU64;
        const THREADS: u64 = 4;
        const WRITES: u64 = 60;
        let size = (THREADS * WRITES * 512) as usize;
        for seed in 0..20 {
            let key = VolumeKey::generate().unwrap();
            let fault = Arc::new(FaultBackend::new(vec![0u8; size], 512, seed));
            fault.set_faults(FaultPlan {
                flush_eio: 100_000,
                flush_eio_return_us: 500,
                flush_us: 300,
                ..Default::default()
            });
            let e = Arc::new(fault_export(fault.clone(), &key));
            let clock = Arc::new(AtomicU64::new(0));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (e, clock) = (e.clone(), clock.clone());
                    std::thread::spawn(move || {
                        // (sector, acked at) and (flush issued at, succeeded)
                        let mut log = Vec::new();
                        for i in 0..WRITES {
                            let sector = t * WRITES + i;
                            e.write(sector * 512, &mut vec![(sector % 251) as u8 + 1; 512], false).unwrap();
                            let acked = clock.fetch_add(1, Ordering::SeqCst);
                            let issued = clock.fetch_add(1, Ordering::SeqCst);
                            log.push((sector, acked, issued, e.flush().is_ok()));
                        }
                        log
                    })
                })
                .collect();
            let log: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
            let image = fault.power_cut(CutMode::DropAll);
            let after = fault_export(Arc::new(FaultBackend::new(image, 512, 0)), &key);
            let last_ok_flush = log.iter().filter(|l| l.3).map(|l| l.2).max();
            for &(sector, acked, _, _) in &log {
                if last_ok_flush.is_some_and(|f| acked < f) {
                    let mut got = vec![0u8; 512];
                    after.read(sector * 512, &mut got).unwrap();
                    assert!(got.iter().all(|&b| b == (sector % 251) as u8 + 1), "seed {seed}: sector {sector} lost");
                }
            }
        }
    }

    #[test]
    fn concurrent_flushes_share_one_flush_of_the_raw_volume() {
        use crate::backend::fault::{FaultBackend, FaultPlan};
        let fault = Arc::new(FaultBackend::new(vec![0u8; 16384], 512, 1));
        fault.set_faults(FaultPlan { flush_us: 3000, ..Default::default() });
        let e = Arc::new(fault_export(fault.clone(), &VolumeKey::generate().unwrap()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || (0..10).for_each(|_| e.flush().unwrap()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let backend_flushes = fault.stats().flushes;
        assert!(backend_flushes < 60, "80 flush requests cost {backend_flushes} flushes of the raw volume");
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
