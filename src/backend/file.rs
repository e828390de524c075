//! A raw volume that is a regular file or a block device, driven with pread/pwrite.
//!
//! Block devices report their size through seeking to the end (works for files too, and
//! needs no ioctl). Discard punches a hole in regular files; block devices report
//! `Unsupported` (BLKDISCARD would need an ioctl; discard is advisory anyway).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::Backend;

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
}

impl FileBackend {
    /// Opens an existing file or block device; never creates one.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(writable).open(path)?;
        let ft = file.metadata()?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a regular file nor a block device", path.display()),
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileBackend { file, path: path.to_owned(), size, is_block_device: ft.is_block_device() })
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
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
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

    fn describe(&self) -> String {
        let kind = if self.is_block_device { "block device" } else { "file" };
        format!("{kind} {}", self.path.display())
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
    fn short_read_past_end_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(100).unwrap();
        let b = FileBackend::open(f.path(), false).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(b.read_at(&mut buf, 95).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
