//! The raw volume under the encryption: a narrow positional-I/O trait, a file/block-device
//! implementation, an in-memory fake for tests, and a fault-injecting fake (power cuts, EIO,
//! short I/O) for the reliability tests.
//!
//! Offsets here are raw-volume byte offsets (the header lives at 0, the data area further on);
//! the export translates data-area offsets before calling in.

use std::io;

pub mod fault;
pub mod file;
pub mod mapping;
pub mod mem;

pub use fault::FaultBackend;
pub use file::{Caching, FileBackend};
pub use mapping::Mapped;
pub use mem::MemBackend;

/// Positional I/O on the raw volume. Calls may run concurrently from several threads on
/// disjoint or overlapping ranges; the export serialises overlapping writes itself.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Size of the raw volume in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; a short read (end of volume) is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Like [`Backend::read_at`], but only if the data can be had without waiting for the
    /// device (it is in the page cache): `Ok(false)` means "would block, use `read_at`", and
    /// leaves `buf` unspecified. Lets the caller serve cache hits on its own thread. The
    /// default never tries.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// True if a write only copies into a cache (buffered I/O) and so usually returns
    /// quickly: the caller may then write small requests on its own thread instead of a
    /// blocking pool (unless the device is holding writes up: `export::backpressure`).
    fn cached_writes(&self) -> bool {
        false
    }

    /// Runs `f` on the raw bytes `[offset, offset + len)` straight out of a mapping of the
    /// volume (see [`mapping`]), so a reader can decrypt them without copying them first.
    /// `None` if the backend has no mapping, the range is outside it or not all cached, or the
    /// mapping faulted (an I/O error): whatever `f` produced is then garbage, and
    /// [`Backend::read_at`] reports the error. Only cached ranges are read, so it blocks only
    /// on a page evicted since the check (callers on an async task accept that rare stall).
    fn read_mapped(&self, _offset: u64, _len: usize, _f: &mut dyn FnMut(Mapped<'_>)) -> Option<()> {
        None
    }

    /// What `O_DIRECT` needs: offsets, lengths and buffer addresses that are multiples of
    /// this many bytes (a power of two, at most [`crate::buf::ALIGN`]). 1 when any will do.
    fn alignment(&self) -> u64 {
        1
    }

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;

    /// Releases the storage of a range whose contents no longer matter. Backends that cannot
    /// do this return `Unsupported`; callers treat discard as advisory.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Makes `[offset, offset + len)` read as zeros: unlike [`Backend::discard`], the zeros
    /// are guaranteed. Backends that can release the storage meanwhile (a hole in a file)
    /// override this; the default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }

    /// A short human description for logs (`file /path`, `memory`).
    fn describe(&self) -> String;
}

/// [`Backend::zero_range`] by writing zeros, 1 MiB at a time.
pub(crate) fn write_zeros<B: Backend + ?Sized>(b: &B, offset: u64, len: u64) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = PIECE.min(len - at);
        b.write_at(&zeros[..n as usize], offset + at)?;
        at += n;
    }
    Ok(())
}
