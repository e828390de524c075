//! Exclusive locks on byte ranges, for writers: a write (or zero, trim) holds the sector range
//! it touches, so a read-modify-write never interleaves with another write to the same sector.
//!
//! A short critical section scans the (small) list of held ranges; a writer whose range
//! overlaps one waits on the condvar. Releasing wakes waiters only if there are any, so an
//! uncontended lock costs two mutex round trips and no system call.

use std::sync::{Condvar, Mutex};

use crate::units::ByteRange;

#[derive(Debug, Default)]
pub(super) struct RangeLocks {
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    /// Held ranges, `[start, end)`.
    ranges: Vec<(u64, u64)>,
    waiters: usize,
}

impl Held {
    fn overlaps(&self, (start, end): (u64, u64)) -> bool {
        self.ranges.iter().any(|&(s, e)| s < end && start < e)
    }
}

/// A held range; released on drop.
pub(super) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no other writer holds a range overlapping `r`, then holds it.
    pub(super) fn lock(&self, r: ByteRange) -> RangeGuard<'_> {
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
    pub(super) fn try_lock(&self, r: ByteRange) -> Option<RangeGuard<'_>> {
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
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange::new(offset, len).unwrap()
    }

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let locks = RangeLocks::default();
        let _g = locks.lock(r(4096, 8192));
        assert!(locks.try_lock(r(8192, 512)).is_none());
        assert!(locks.try_lock(r(0, 4097)).is_none());
    }

    #[test]
    fn adjacent_ranges_do_not_conflict() {
        let locks = RangeLocks::default();
        let _a = locks.lock(r(4096, 4096));
        assert!(locks.try_lock(r(0, 4096)).is_some());
        assert!(locks.try_lock(r(8192, 4096)).is_some());
    }

    #[test]
    fn dropping_the_guard_releases_the_range() {
        let locks = RangeLocks::default();
        drop(locks.lock(r(0, 4096)));
        assert!(locks.try_lock(r(0, 4096)).is_some());
    }

    #[test]
    fn a_waiting_writer_proceeds_once_the_overlapping_range_is_released() {
        let locks = Arc::new(RangeLocks::default());
        let first = locks.lock(r(0, 8192));
        let acquired = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (locks, acquired) = (Arc::clone(&locks), Arc::clone(&acquired));
            std::thread::spawn(move || {
                let _g = locks.lock(r(4096, 4096));
                acquired.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!acquired.load(Ordering::SeqCst), "took a range another writer holds");
        drop(first);
        waiter.join().unwrap();
        assert!(acquired.load(Ordering::SeqCst));
    }
}
