//! Whether the raw volume is pushing back on writes, so that they leave the connection's
//! thread.
//!
//! A connection's thread writes cached-volume requests itself (no thread hop; see
//! [`super::Export::try_write`]), which is only right while a write is a copy into the page
//! cache. When the device cannot keep up, the kernel throttles writers in
//! `balance_dirty_pages`, up to 200 ms per call, and everything else on that thread waits too:
//! reads of cached data on the same connection, and every other connection on the thread.
//! Measured on a throttled volume (a 7 MiB/s device), 4 KiB reads of cached data on another
//! connection of the same thread fell from about 14,000 to 24 per second (p99 204 ms) while
//! 128 KiB writes were written inline; with the writes on the blocking pool, they stayed at
//! about 14,000.
//!
//! There is no way to ask the kernel whether a buffered write would be throttled
//! (`RWF_NOWAIT` is refused for buffered writes by ext4 and block devices), so the writes
//! themselves are timed: one that took longer than [`slow_limit`] marks the volume as pushing
//! back for [`HOLD`], and meanwhile every write goes to the blocking pool, where the slow ones
//! keep extending the hold. When the device catches up, writes are inline again at most
//! [`HOLD`] later. So a connection's thread stalls on at most one throttled write each time
//! the device falls behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long writes stay off the connection threads after a slow one.
pub(super) const HOLD: Duration = Duration::from_secs(1);

/// A write of `len` bytes that takes longer than this was held up by the device (dirty
/// throttling, a journal or writeback wait), not by copying: a cached write costs well under
/// 1 ms per MiB here (copying a MiB into the page cache 0.15–0.35 ms in `pwrite` loops, the
/// AES pass under 0.15), and a throttled one waits for tens to hundreds of milliseconds.
pub(super) fn slow_limit(len: usize) -> Duration {
    let mib = u32::try_from(len >> 20).unwrap_or(u32::MAX);
    Duration::from_millis(10).saturating_add(Duration::from_millis(1).saturating_mul(mib))
}

#[derive(Debug)]
pub(super) struct Backpressure {
    origin: Instant,
    hold: Duration,
    /// Nanoseconds after `origin` until which writes stay off the connection threads; 0:
    /// never slow (the common case needs no clock read).
    until: AtomicU64,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure::with_hold(HOLD)
    }
}

impl Backpressure {
    pub(super) fn with_hold(hold: Duration) -> Self {
        Backpressure { origin: Instant::now(), hold, until: AtomicU64::new(0) }
    }

    /// Whether a write may be done on a connection's thread now.
    pub(super) fn inline_ok(&self) -> bool {
        self.inline_at(Instant::now())
    }

    /// Runs `write` (of `len` bytes) and says whether the device held it up: `None` if not,
    /// else whether this write started a hold (`true`) or extended one.
    pub(super) fn timed<R>(&self, len: usize, write: impl FnOnce() -> R) -> (R, Option<bool>) {
        let start = Instant::now();
        let r = write();
        let end = Instant::now();
        (r, self.record(len, end, end.duration_since(start)))
    }

    /// Accounts for a write of `len` bytes that ended at `end` after `took` (see [`Self::timed`]).
    fn record(&self, len: usize, end: Instant, took: Duration) -> Option<bool> {
        if took <= slow_limit(len) {
            return None;
        }
        let now = self.nanos(end);
        let until = now.saturating_add(u64::try_from(self.hold.as_nanos()).unwrap_or(u64::MAX));
        let before = self.until.fetch_max(until.max(1), Ordering::Relaxed);
        Some(before == 0 || before <= now)
    }

    /// Whether a write may be done inline at `t` (what [`Self::inline_ok`] asks for now).
    fn inline_at(&self, t: Instant) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        until == 0 || self.nanos(t) >= until
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // Synthetic clock readings (`record`, `inline_at`): a test that slept instead would
    // depend on the test machine's scheduling.
    #[test]
    fn a_slow_write_keeps_writes_off_the_connection_threads_for_the_hold() {
        let b = Backpressure::with_hold(300 * MS);
        let t0 = b.origin;
        let slow = slow_limit(4096) + 5 * MS;
        assert!(b.inline_ok());
        assert_eq!(b.record(4096, t0 + 10 * MS, MS), None);
        assert!(b.inline_at(t0 + 10 * MS), "a fast write changes nothing");
        assert_eq!(b.record(4096, t0 + 30 * MS, slow), Some(true), "a slow write starts the hold");
        assert!(!b.inline_at(t0 + 31 * MS));
        assert_eq!(b.record(4096, t0 + 50 * MS, slow), Some(false), "and the next one extends it");
        assert_eq!(b.record(4096, t0 + 200 * MS, MS), None);
        assert!(!b.inline_at(t0 + 340 * MS), "a fast write does not end the hold early");
        assert!(b.inline_at(t0 + 350 * MS), "the hold ends");
        assert_eq!(b.record(4096, t0 + 400 * MS, slow), Some(true), "a slow write after it starts a new one");
        assert!(!b.inline_at(t0 + 401 * MS));
    }

    #[test]
    fn a_write_is_timed() {
        let b = Backpressure::with_hold(Duration::from_secs(3600));
        assert_eq!(b.timed(4096, || 7), (7, None));
        let ((), held) = b.timed(4096, || std::thread::sleep(slow_limit(4096) + 5 * MS));
        assert_eq!(held, Some(true));
        assert!(!b.inline_ok());
    }

    #[test]
    fn the_limit_grows_with_the_write() {
        assert_eq!(slow_limit(4096), Duration::from_millis(10));
        assert_eq!(slow_limit(4 << 20), Duration::from_millis(14));
        assert_eq!(slow_limit(32 << 20), Duration::from_millis(42));
        assert!(slow_limit(usize::MAX) > Duration::from_secs(1000), "saturates, never wraps");
    }
}
