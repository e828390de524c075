//! A raw volume that is a regular file or a block device, driven with pread/pwrite.
//!
//! Block devices report their size through seeking to the end (works for files too, and
//! needs no ioctl). Discard punches a hole in regular files; block devices report
//! `Unsupported` (BLKDISCARD would need an ioctl; discard is advisory anyway).
//!
//! Two caching modes. Buffered (the default) goes through the page cache, like qemu's
//! `cache=writeback`: [`Backend::try_read_at`] uses `preadv2(RWF_NOWAIT)` so the caller can
//! serve cache hits without a thread hop. Direct (`--direct`, like qemu's `cache=none`) opens
//! a second descriptor with `O_DIRECT` for the data path, for real block devices whose data
//! should not be cached twice (the guest caches it already): every aligned I/O goes there,
//! anything unaligned (the header, at open) through the buffered descriptor. The regions never
//! overlap, so the two views stay coherent.
//!
//! In buffered mode the volume is also mapped read-only ([`ReadMapping`]), unless the
//! operator turns that off (`--no-map`, [`Caching::Buffered`]): reads of cached ranges
//! decrypt straight from the page cache through it ([`Backend::read_mapped`]), and `preadv2`
//! only serves what the mapping declines.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::mapping::{Mapped, ReadMapping};
use super::Backend;

/// Buffered writes that reach uncached parts of the volume go to the page cache in pieces of
/// at most this size. Since Linux 6.16 ext4 (like XFS before it) caches a file in folios as
/// large as the write that created them, and a later 4 KiB write into a large folio walks all
/// of its block heads and makes writeback rewrite the whole folio. Measured with fio psync on
/// this project's build box (kernel 6.18, ext4), CPU per random 4 KiB write into a file last
/// written in pieces of 1 MiB / 256 KiB / 64 KiB: 26 / 8 / 3 us. Smaller folios cost
/// sequential writes instead (copying into 4 KiB folios runs at half the speed of 64 KiB
/// ones). Side by side with `benches/ab.sh` against the 64 KiB build, a volume filled through
/// the server by 1 MiB writes then served: 32 KiB pieces made random 4 KiB writes (QD32)
/// 1.19-1.22x as fast and 1 MiB writes 0.97-1.01x; 16 KiB pieces 1.3x and 0.92-0.95x.
///
/// Where the whole range is already cached its folios exist, and the piece size changes
/// nothing but the number of system calls: such writes go in one piece.
const BUFFERED_WRITE_CHUNK: usize = 32 << 10;

/// How the data path reaches the raw volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// Through the page cache, and reads of cached ranges through a read-only mapping of the
    /// volume (the default).
    Mapped,
    /// Through the page cache with `pread`/`pwrite` only (`--no-map`): no mapping, so the
    /// volume's pages never count in the daemon's RSS and an I/O error is always `EIO`, never
    /// a fault; cached reads cost an extra copy.
    Buffered,
    /// `O_DIRECT` (`--direct`, like qemu's `cache=none`).
    Direct,
}

impl Caching {
    /// From the operator's two switches: `direct` wins, else `map` picks the buffered kind.
    pub fn new(direct: bool, map: bool) -> Caching {
        match (direct, map) {
            (true, _) => Caching::Direct,
            (false, false) => Caching::Buffered,
            (false, true) => Caching::Mapped,
        }
    }
}

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The `O_DIRECT` descriptor, in direct mode.
    direct: Option<File>,
    /// `O_DIRECT` alignment (1 in buffered mode).
    align: u64,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
    /// Buffered mode: the whole volume, mapped read-only (`None` if it could not be).
    map: Option<ReadMapping>,
    /// The mapping's poisoning has been logged.
    poison_reported: AtomicBool,
}

impl FileBackend {
    /// Opens an existing file or block device, buffered and mapped; never creates one.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        Self::open_with(path, writable, Caching::Mapped)
    }

    /// Opens an existing file or block device with the given caching. [`Caching::Direct`]
    /// fails if the filesystem refuses `O_DIRECT` or needs an alignment above 4096 bytes.
    pub fn open_with(path: &Path, writable: bool, caching: Caching) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(writable).open(path)?;
        let ft = file.metadata()?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a regular file nor a block device", path.display()),
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        let is_block_device = ft.is_block_device();
        let (direct, align) = if caching == Caching::Direct {
            let d = OpenOptions::new().read(true).write(writable).custom_flags(libc::O_DIRECT).open(path)?;
            let align = dio_alignment(&d, is_block_device);
            if align > crate::buf::ALIGN as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{} needs {align}-byte aligned direct I/O (at most 4096 supported)", path.display()),
                ));
            }
            (Some(d), align)
        } else {
            (None, 1)
        };
        let map = if caching == Caching::Mapped { ReadMapping::new(&file, size) } else { None };
        Ok(FileBackend {
            file,
            direct,
            align,
            path: path.to_owned(),
            size,
            is_block_device,
            map,
            poison_reported: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Takes a non-blocking whole-file `fcntl` record lock (exclusive or shared), held until
    /// the process closes the file. False if another process holds a conflicting one. This is
    /// the "volume in use" lock between `serve` and the offline operations of
    /// [`crate::migrate`]; it is independent of the `flock` that header-changing commands take,
    /// so those still work on a served volume.
    pub fn try_lock(&self, exclusive: bool) -> bool {
        use rustix::fs::{fcntl_lock, FlockOperation};
        let op =
            if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
        fcntl_lock(&self.file, op).is_ok()
    }

    /// The `O_DIRECT` descriptor, if this I/O can use it.
    fn direct_for(&self, buf: &[u8], offset: u64) -> Option<&File> {
        let a = self.align;
        let aligned =
            offset.is_multiple_of(a) && (buf.len() as u64).is_multiple_of(a) && (buf.as_ptr() as u64).is_multiple_of(a);
        self.direct.as_ref().filter(|_| aligned)
    }
}

/// The alignment `O_DIRECT` needs on `file`: `statx(STATX_DIOALIGN)` (Linux 6.1; block
/// devices 6.11), else the logical block size of a block device, else 4096 (safe everywhere).
fn dio_alignment(file: &File, is_block_device: bool) -> u64 {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    if let Ok(st) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) && st.stx_dio_offset_align > 0 {
            return u64::from(st.stx_dio_offset_align.max(st.stx_dio_mem_align)).next_power_of_two();
        }
    }
    if is_block_device {
        if let Ok(n) = rustix::fs::ioctl_blksszget(file) {
            return u64::from(n.max(1)).next_power_of_two();
        }
    }
    crate::buf::ALIGN as u64
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct_for(buf, offset) {
            Some(d) => d.read_exact_at(buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct_for(buf, offset) {
            return d.write_all_at(buf, offset);
        }
        // See BUFFERED_WRITE_CHUNK. Without a mapping, residency is unknown: split.
        if buf.len() <= BUFFERED_WRITE_CHUNK || self.map.as_ref().is_some_and(|m| m.resident(offset, buf.len())) {
            return self.file.write_all_at(buf, offset);
        }
        let mut pos = offset;
        for piece in buf.chunks(BUFFERED_WRITE_CHUNK) {
            self.file.write_all_at(piece, pos)?;
            pos += piece.len() as u64;
        }
        Ok(())
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        if self.direct.is_some() {
            return Ok(false);
        }
        match preadv2(&self.file, &mut [io::IoSliceMut::new(buf)], offset, ReadWriteFlags::NOWAIT) {
            // A short read is a partly cached range (or the end of the volume): let the
            // blocking path redo it whole and report it properly.
            Ok(n) => Ok(n == buf.len()),
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn cached_writes(&self) -> bool {
        self.direct.is_none()
    }

    fn read_mapped(&self, offset: u64, len: usize, f: &mut dyn FnMut(Mapped<'_>)) -> Option<()> {
        let map = self.map.as_ref()?;
        let r = map.read(offset, len, f);
        // Once poisoned, every read takes the pread path for the rest of the daemon's life:
        // say so once, so a slower volume after an I/O error has an explanation in the log.
        if r.is_none() && map.poisoned() && !self.poison_reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                volume = %self.path.display(),
                "a read through the volume's mapping faulted (an I/O error, or the volume shrank); \
                 reading with pread from now on"
            );
        }
        r
    }

    fn alignment(&self) -> u64 {
        self.align
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return Err(io::ErrorKind::Unsupported.into());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(io::Error::from)
    }

    /// `fallocate(PUNCH_HOLE)`: a hole in a file; on a block device, zeroes that the device
    /// unmaps (Linux 4.9+, where it supports that). Else `ZERO_RANGE` (a block device writes
    /// zeros itself, as `BLKZEROOUT`), else zeros written from here.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        let unsupported = |e: &rustix::io::Errno| {
            matches!(*e, rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NODEV)
        };
        match fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if !unsupported(&e) => return Err(e.into()),
            Err(_) => {}
        }
        match fallocate(&self.file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if !unsupported(&e) => Err(e.into()),
            Err(_) => super::write_zeros(self, offset, len),
        }
    }

    fn describe(&self) -> String {
        let kind = if self.is_block_device { "block device" } else { "file" };
        let mode = match (&self.direct, &self.map) {
            (Some(_), _) => format!(", O_DIRECT ({}-byte aligned)", self.align),
            (None, Some(_)) => String::new(),
            (None, None) => ", not mapped".to_owned(),
        };
        format!("{kind} {}{mode}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_written() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let b = FileBackend::open(f.path(), true).unwrap();
        assert_eq!(b.size(), 8192);
        b.write_at(b"hello", 4000).unwrap();
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn large_writes_read_back_into_uncached_and_cached_ranges() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        let b = FileBackend::open(f.path(), true).unwrap();
        let map = b.map.as_ref().unwrap();
        let first: Vec<u8> = (0..(1usize << 20) + 512).map(|i| (i % 251) as u8).collect();
        let at = 4096 + 512;
        // A hole never read: not cached, so written in pieces.
        assert!(!map.resident(at, first.len()));
        b.write_at(&first, at).unwrap();
        // Now cached: the next write of the range goes in one piece.
        assert!(map.resident(at, first.len()));
        assert!(!map.resident(at, 4 << 20), "past the end of the mapping");
        let second: Vec<u8> = first.iter().map(|x| x ^ 0x5a).collect();
        b.write_at(&second, at).unwrap();
        let mut back = vec![0u8; second.len()];
        b.read_at(&mut back, at).unwrap();
        assert!(back == second);
    }

    #[test]
    fn cached_data_is_read_without_blocking() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let b = FileBackend::open(f.path(), true).unwrap();
        b.write_at(&[9u8; 4096], 4096).unwrap();
        let mut buf = [0u8; 4096];
        assert!(b.try_read_at(&mut buf, 4096).unwrap());
        assert_eq!(buf, [9u8; 4096]);
        assert!(b.cached_writes());
    }

    #[test]
    fn direct_mode_reads_back_aligned_and_unaligned_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let b = match FileBackend::open_with(&path, true, Caching::Direct) {
            Ok(b) => b,
            // tmpfs and some overlay filesystems refuse O_DIRECT: nothing to test there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        assert!(!b.cached_writes());
        assert!(b.alignment() >= 512 && b.alignment() <= 4096);
        let mut data = crate::buf::AlignedBuf::zeroed(8192);
        data.fill(0x5A);
        b.write_at(&data, 65536).unwrap();
        b.write_at(b"header", 3).unwrap();
        let mut back = crate::buf::AlignedBuf::zeroed(8192);
        assert!(!b.try_read_at(&mut back, 65536).unwrap());
        b.read_at(&mut back, 65536).unwrap();
        assert!(back.iter().all(|&x| x == 0x5A));
        let mut small = [0u8; 6];
        b.read_at(&mut small, 3).unwrap();
        assert_eq!(&small, b"header");
    }

    #[test]
    fn buffered_mode_has_no_mapping_and_still_reads_cached_data_inline() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let mapped = FileBackend::open(f.path(), true).unwrap();
        assert!(mapped.map.is_some());
        assert!(!mapped.describe().contains("not mapped"));
        let b = FileBackend::open_with(f.path(), true, Caching::Buffered).unwrap();
        assert!(b.map.is_none());
        assert!(b.describe().ends_with(", not mapped"), "{}", b.describe());
        assert!(b.cached_writes());
        let data: Vec<u8> = (0..256 << 10).map(|i| (i % 253) as u8).collect();
        b.write_at(&data, 4096).unwrap();
        assert!(b.read_mapped(4096, 4096, &mut |_| {}).is_none());
        let mut back = vec![0u8; data.len()];
        assert!(b.try_read_at(&mut back, 4096).unwrap());
        assert!(back == data);
    }

    #[test]
    fn short_read_past_end_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(100).unwrap();
        let b = FileBackend::open(f.path(), false).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(b.read_at(&mut buf, 95).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
