//! An in-memory backend for unit tests: a `Vec<u8>` behind a lock, with counters so tests can
//! check what reached "disk" and when it was flushed.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use super::Backend;

#[derive(Debug)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    flushes: AtomicU64,
}

impl MemBackend {
    pub fn new(size: usize) -> Self {
        MemBackend { data: RwLock::new(vec![0; size]), flushes: AtomicU64::new(0) }
    }

    /// A copy of the whole raw volume, to inspect what was written.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Overwrites raw bytes, bypassing everything (to simulate corruption).
    pub fn poke(&self, offset: usize, bytes: &[u8]) {
        if let Ok(mut d) = self.data.write() {
            d[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

fn range(len: usize, offset: u64, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let end = start.checked_add(len).filter(|&e| e <= size);
    end.map(|e| start..e).ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().map_err(|_| io::Error::other("poisoned"))?;
        let r = range(buf.len(), offset, d.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| io::Error::other("poisoned"))?;
        let r = range(buf.len(), offset, d.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }

    fn cached_writes(&self) -> bool {
        true
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| io::Error::other("poisoned"))?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = range(len, offset, d.len())?;
        d[r].fill(0);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
