//! A read-only shared mapping of the raw volume, so reads can be decrypted straight out of the
//! page cache: one pass over the ciphertext instead of `pread`'s copy plus an in-place decrypt.
//! Over TCP, 1 MiB reads spent 26% of the server's CPU in that copy (see README, Performance).
//!
//! The price of a mapping is `SIGBUS`: touching a page the kernel cannot supply (an I/O error
//! reading it in, or a file truncated under us) raises a signal instead of returning `EIO`,
//! and by default that kills the daemon and every connection with it. So the first mapping
//! installs a `SIGBUS` handler. A fault inside one of our mappings marks that mapping
//! *poisoned* and maps a zero page over the faulting page, so the interrupted instruction
//! completes; the reader then sees the poison and discards what it read, and the caller falls
//! back to `pread`, which reports the error the ordinary way. A poisoned mapping is never read
//! again. Any other `SIGBUS` goes to the handler that was there before (Rust's runtime, which
//! reports stack overflows), or gets the default action.
//!
//! Readers never get a Rust reference to mapped memory (another process, or our own writes,
//! may change it at any time): only [`Mapped`], a pointer that the cipher hands to its engine
//! (AWS-LC, or the wide XTS, which loads each 64 bytes once into a register) and otherwise
//! reads with volatile loads.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings registered with the signal handler at once, at most (one per served volume; a
/// volume beyond this is read with `pread`).
const SLOTS: usize = 64;

/// One registered mapping: `[start, end)`, or `start == 0` for a free slot.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const FREE: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), poisoned: AtomicBool::new(false) };
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
/// The `SIGBUS` action replaced by ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// A read-only `MAP_SHARED` mapping of a whole file or block device, registered with the
/// `SIGBUS` handler for as long as it lives.
#[derive(Debug)]
pub struct ReadMapping {
    base: usize,
    len: usize,
    slot: usize,
}

/// `len` bytes of a [`ReadMapping`], valid for `'a`. Only a pointer: see the module doc.
#[derive(Debug, Clone, Copy)]
pub struct Mapped<'a> {
    ptr: *const u8,
    len: usize,
    _life: PhantomData<&'a ()>,
}

impl<'a> Mapped<'a> {
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `[offset, offset + len)` of this range (`None` if outside it).
    pub fn sub(self, offset: usize, len: usize) -> Option<Mapped<'a>> {
        let end = offset.checked_add(len)?;
        // SAFETY: offset <= end <= self.len, so the result stays inside the same mapping.
        (end <= self.len).then(|| Mapped { ptr: unsafe { self.ptr.add(offset) }, len, _life: PhantomData })
    }

    /// Ordinary memory seen as mapped bytes, for tests of the code that reads them.
    #[cfg(test)]
    pub fn of_slice(s: &[u8]) -> Mapped<'_> {
        Mapped { ptr: s.as_ptr(), len: s.len(), _life: PhantomData }
    }
}

impl ReadMapping {
    /// Maps the first `len` bytes of `file` read-only. `None` if the mapping cannot be made
    /// (address space, a file that cannot be mapped) or every registry slot is taken: the
    /// caller then reads with `pread`.
    pub fn new(file: &File, len: u64) -> Option<ReadMapping> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        INSTALL.call_once(install_handler);
        // SAFETY: a new mapping (no address hint, so it replaces nothing) of an open file
        // descriptor; PROT_READ only, so nothing we do can change the file through it.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        let unmap = || {
            // SAFETY: `p` is the mapping just made, of `len` bytes, used by nobody.
            unsafe { libc::munmap(p, len) };
        };
        let Some(slot) = REGISTRY
            .iter()
            .position(|s| s.start.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok())
        else {
            unmap();
            return None;
        };
        // `start` is usize::MAX (matches no address) until `end` is in place.
        let s = &REGISTRY[slot];
        s.poisoned.store(false, Ordering::SeqCst);
        s.end.store(base + len, Ordering::SeqCst);
        s.start.store(base, Ordering::SeqCst);
        Some(ReadMapping { base, len, slot })
    }

    /// Whether a read through this mapping ever faulted.
    pub fn poisoned(&self) -> bool {
        REGISTRY[self.slot].poisoned.load(Ordering::SeqCst)
    }

    /// Runs `f` on the bytes `[offset, offset + len)`. `None` if the range is outside the
    /// mapping, not all in the page cache, or the mapping is poisoned before or after `f` ran
    /// (whatever `f` read is then garbage: discard it and use `pread`). Uncached data is left
    /// to `pread` because faults through the mapping read it in readahead-window pieces
    /// (128 KiB by default) one after another, where `pread` asks for the whole request at
    /// once: on a network volume, that is the difference between one round trip and eight
    /// per MiB. `f` may still block on a page fault (the page was evicted meanwhile), which is
    /// rare enough for the connection tasks to read through it inline.
    pub fn read<R>(&self, offset: u64, len: usize, f: impl FnOnce(Mapped<'_>) -> R) -> Option<R> {
        if self.poisoned() {
            return None;
        }
        let start = self.cached_start(offset, len)?;
        self.access(start, len, f)
    }

    /// Whether `[offset, offset + len)` is inside the mapping and all in the page cache.
    pub fn resident(&self, offset: u64, len: usize) -> bool {
        self.cached_start(offset, len).is_some()
    }

    /// `offset` as an index into the mapping, if `[offset, offset + len)` is inside it and all
    /// in the page cache.
    fn cached_start(&self, offset: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.len && self.cached(start, end)).then_some(start)
    }

    /// `f` on `[start, start + len)`, inside the mapping; `None` if it faulted meanwhile.
    fn access<R>(&self, start: usize, len: usize, f: impl FnOnce(Mapped<'_>) -> R) -> Option<R> {
        debug_assert!(start + len <= self.len);
        // SAFETY: start + len <= self.len (the caller's check): inside the mapping, which
        // outlives this call.
        let m = Mapped { ptr: unsafe { (self.base as *const u8).add(start) }, len, _life: PhantomData };
        let r = f(m);
        (!self.poisoned()).then_some(r)
    }

    /// Whether every page of `[start, end)` (within the mapping) is in the page cache, by
    /// `mincore`. False when it cannot tell: since Linux 5.2, for a file the process neither
    /// owns nor may write, `mincore` only reports pages this process has touched.
    fn cached(&self, start: usize, end: usize) -> bool {
        let page = PAGE.load(Ordering::Relaxed);
        let mut vec = [0u8; 256];
        let mut pos = start & !(page - 1);
        while pos < end {
            let pages = (end - pos).div_ceil(page).min(vec.len());
            // SAFETY: `pos` is page-aligned and `pos + pages * page` is at most `end` rounded up
            // to a page, inside the mapping (which covers whole pages); `vec` has room for
            // `pages` entries.
            let r = unsafe { libc::mincore((self.base + pos) as *mut c_void, pages * page, vec.as_mut_ptr()) };
            if r != 0 || vec[..pages].iter().any(|&b| b & 1 == 0) {
                return false;
            }
            pos += pages * page;
        }
        true
    }
}

impl Drop for ReadMapping {
    fn drop(&mut self) {
        let s = &REGISTRY[self.slot];
        s.start.store(usize::MAX, Ordering::SeqCst);
        // SAFETY: the mapping made in `new`, of `len` bytes; `&mut self` means no reader is
        // inside `read`, and no `Mapped` outlives its `read` call.
        unsafe { libc::munmap(self.base as *mut c_void, self.len) };
        s.end.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
    }
}

fn install_handler() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let Ok(page) = usize::try_from(page) {
        if page.is_power_of_two() {
            PAGE.store(page, Ordering::Relaxed);
        }
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has the
    // SA_SIGINFO signature; `old` receives the previous action.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut old) == 0 {
            let _ = PREVIOUS.set(old);
        }
    }
}

/// The `SIGBUS` handler. Async-signal-safe: atomics and the `mmap` and `sigaction` system
/// calls only.
extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &REGISTRY {
        let start = s.start.load(Ordering::SeqCst);
        let end = s.end.load(Ordering::SeqCst);
        if start == 0 || start == usize::MAX || addr < start || addr >= end {
            continue;
        }
        // Poison first: a reader that sees the zero page sees the poison after it.
        s.poisoned.store(true, Ordering::SeqCst);
        let page = addr & !(PAGE.load(Ordering::Relaxed) - 1);
        // SAFETY: `page` lies inside a live mapping of ours (it is unregistered before it is
        // unmapped); replacing one of its pages with an anonymous zero page only changes what
        // readers of a poisoned mapping see, and they discard it.
        let p = unsafe {
            libc::mmap(
                page as *mut c_void,
                PAGE.load(Ordering::Relaxed),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return;
        }
        break;
    }
    forward(sig, info, ctx);
}

/// Hands a `SIGBUS` that is not ours to the previous handler, or restores the default action
/// so that the faulting instruction, run again on return, gets it.
fn forward(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if let Some(old) = PREVIOUS.get() {
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; it was installed for
                // this signal and gets the arguments we got.
                let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number.
                let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: a zeroed sigaction with SIG_DFL (0) is the default action.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// Reads the mapped bytes (volatile: the memory is not ours).
    fn copy(m: Mapped<'_>) -> Vec<u8> {
        // SAFETY: i < m.len(), inside the range `read` handed out.
        (0..m.len()).map(|i| unsafe { std::ptr::read_volatile(m.as_ptr().add(i)) }).collect()
    }

    #[test]
    fn reads_what_the_file_holds_and_sees_later_writes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let m = ReadMapping::new(f.as_file(), data.len() as u64).unwrap();
        assert_eq!(m.read(4096, 100, copy).unwrap(), data[4096..4196]);
        assert!(m.read(3 * 4096 - 10, 11, copy).is_none(), "past the end");
        std::os::unix::fs::FileExt::write_all_at(f.as_file(), b"new", 4096).unwrap();
        assert_eq!(m.read(4096, 3, copy).unwrap(), b"new");
    }

    #[test]
    fn data_not_in_the_page_cache_is_left_to_pread() {
        // A disk-backed folder: a tmpfs file is always "cached".
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        if rustix::fs::statfs(dir.path()).unwrap().f_type == 0x0102_1994 {
            eprintln!("skipped: the checkout is on a tmpfs");
            return;
        }
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![5u8; 64 * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        let m = ReadMapping::new(&f, 64 * 4096).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(m.read(0, 64 * 4096, copy).is_none(), "evicted: not read through the mapping");
        let mut buf = vec![0u8; 8 * 4096];
        f.read_exact_at(&mut buf, 16 * 4096).unwrap();
        assert_eq!(m.read(16 * 4096, 8 * 4096, copy).unwrap(), buf, "cached again by pread");
        assert!(m.read(0, 64 * 4096, copy).is_none(), "the rest is still not cached");
    }

    #[test]
    fn a_truncated_file_poisons_the_mapping_instead_of_killing_the_process() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 4 * 4096]).unwrap();
        let m = ReadMapping::new(f.as_file(), 4 * 4096).unwrap();
        assert_eq!(m.read(3 * 4096, 4, copy).unwrap(), [7; 4]);
        f.as_file().set_len(4096).unwrap();
        // Page 3 is now past the end of the file: touching it raises SIGBUS. (`read` would
        // usually not touch it, finding it uncached; a page evicted between that check and
        // the access is the case this covers.)
        assert!(!m.poisoned());
        assert!(m.access(3 * 4096, 4, copy).is_none());
        assert!(m.poisoned());
        assert!(m.read(0, 4, copy).is_none(), "a poisoned mapping is not read again");
        // Other mappings are unaffected.
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().write_all_at(b"ok", 0).unwrap();
        let n = ReadMapping::new(g.as_file(), 2).unwrap();
        assert_eq!(n.read(0, 2, copy).unwrap(), b"ok");
    }
}
