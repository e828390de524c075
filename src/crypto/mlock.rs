//! Page locks for key memory: every allocation that holds key bytes (a [`crate::crypto::Secret`],
//! an AWS-LC key schedule) is `mlock`ed so it is never written to swap.
//!
//! `mlock` works on whole pages and does not nest: one `munlock` unlocks a page however many
//! locked allocations share it. Small heap allocations do share pages, so every lock goes
//! through here and is counted per page; a page is unlocked only when the last [`PageLock`]
//! on it is dropped. (Locks must not outlive their allocations for long either: that would pin
//! heap pages for good. Owners keep the lock next to the allocation, and it goes with it.)
//!
//! What the OS refuses (`RLIMIT_MEMLOCK` too low, no `CAP_IPC_LOCK`) is warned about once and
//! counted: [`unlocked_allocations`] is reported by `nbdcrypt status`, and 0 there means every
//! live key allocation is locked.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Lock count per locked page (keyed by page address).
static PAGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// Live key allocations whose `mlock` failed.
static UNLOCKED: AtomicUsize = AtomicUsize::new(0);

/// Set once the first failure is logged.
static WARNED: AtomicBool = AtomicBool::new(false);

/// A lock on the pages of one key allocation, released on drop (keep it next to the
/// allocation; dropping it first only lets those pages be swapped).
#[derive(Debug)]
#[must_use = "the pages are unlocked again when the lock is dropped"]
pub struct PageLock {
    addr: usize,
    len: usize,
    locked: bool,
}

impl PageLock {
    /// Whether the OS locked the pages.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

/// Locks the pages holding `len` bytes at `ptr` (a live allocation of the caller's).
pub fn lock(ptr: *const u8, len: usize) -> PageLock {
    let addr = ptr as usize;
    let mut pages = PAGES.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: mlock only changes the residency of the pages containing the range and does
    // not access the memory; the range is a live allocation, so it is mapped.
    let locked = len == 0 || unsafe { rustix::mm::mlock(ptr as *mut c_void, len) }.is_ok();
    if locked {
        for page in page_range(addr, len) {
            *pages.entry(page).or_insert(0) += 1;
        }
    } else {
        UNLOCKED.fetch_add(1, Ordering::Relaxed);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "could not lock key memory (mlock failed; raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK); key pages may be swapped"
            );
        }
    }
    PageLock { addr, len, locked }
}

impl Drop for PageLock {
    /// Gives up this lock: pages no other key allocation holds are unlocked.
    fn drop(&mut self) {
        if !self.locked {
            UNLOCKED.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut pages = PAGES.lock().unwrap_or_else(PoisonError::into_inner);
        for page in page_range(self.addr, self.len) {
            let Some(n) = pages.get_mut(&page) else { continue };
            *n -= 1;
            if *n == 0 {
                pages.remove(&page);
                // SAFETY: munlock does not access the memory; an address that is no longer
                // mapped only makes it fail, which changes nothing.
                let _ = unsafe { rustix::mm::munlock(page as *mut c_void, page_size()) };
            }
        }
    }
}

/// Pages locked for key memory now.
pub fn locked_pages() -> usize {
    PAGES.lock().unwrap_or_else(PoisonError::into_inner).len()
}

/// Live key allocations that could not be locked.
pub fn unlocked_allocations() -> usize {
    UNLOCKED.load(Ordering::Relaxed)
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) {
        Ok(p) if p.is_power_of_two() => p,
        _ => 4096,
    })
}

/// The addresses of the pages `[addr, addr + len)` touches (none for an empty range).
fn page_range(addr: usize, len: usize) -> impl Iterator<Item = usize> {
    let page = page_size();
    let first = addr & !(page - 1);
    let end = if len == 0 { first } else { (addr.saturating_add(len - 1) & !(page - 1)) + page };
    (first..end).step_by(page)
}

/// Whether the page holding `addr` is locked, from the `VmFlags` of its mapping in
/// `/proc/self/smaps` (`lo`): what the kernel says, not what this module counted.
#[cfg(test)]
pub fn kernel_says_locked(addr: usize) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
            inside = (a..b).contains(&addr);
        } else if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().any(|f| f == "lo");
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges_cover_exactly_the_touched_pages() {
        let p = page_size();
        assert_eq!(page_range(p, 0).count(), 0);
        assert_eq!(page_range(p, 1).collect::<Vec<_>>(), [p]);
        assert_eq!(page_range(p, p).collect::<Vec<_>>(), [p]);
        assert_eq!(page_range(p + p - 8, 16).collect::<Vec<_>>(), [p, 2 * p]);
    }

    #[test]
    fn a_shared_page_stays_locked_until_its_last_lock_is_released() {
        // Two small key allocations on one page, as the heap often places them.
        let page = page_size();
        let buf = vec![0u8; 3 * page];
        let base = (buf.as_ptr() as usize + page - 1) & !(page - 1);
        let (a, b) = (base as *const u8, (base + 64) as *const u8);
        let la = lock(a, 32);
        let lb = lock(b, 32);
        assert!(la.is_locked() && lb.is_locked(), "mlock refused (RLIMIT_MEMLOCK?)");
        assert!(kernel_says_locked(base));
        drop(la);
        assert!(kernel_says_locked(base), "releasing one lock unlocked a page another still holds");
        drop(lb);
        assert!(!kernel_says_locked(base));
    }
}
