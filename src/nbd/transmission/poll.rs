//! Adaptive busy poll: whether a quiet connection's thread keeps checking its socket for the
//! next request or sleeps.
//!
//! Polling pays when the client comes back within the window (the request then finds the
//! thread awake instead of paying a cross-CPU wake-up) and costs a window of CPU when it does
//! not. A client stack that turns around slower than the window (nbdfuse + loop measured
//! 0.66× as fast with a fixed 50 µs window on 2 vCPUs) loses twice: the CPU burnt is the CPU
//! its own threads wanted. So each window that ends without a request (a miss) makes the
//! connection skip polling for the next 1, 2, 4, … up to [`MAX_BACKOFF`] quiet periods, and
//! [`RESET_AFTER_HITS`] requests in a row caught by a poll (hits) bring it back to polling every
//! time. A client that never comes back in time costs one window per `MAX_BACKOFF` requests;
//! one that misses more than about one poll in 16 backs off too.

use std::time::{Duration, Instant};

use crate::metrics::{ExportMetrics, PollOutcome};

/// Most quiet periods skipped after a run of misses: at 10k requests per second, a probe every
/// 26 ms, and about 0.2 µs of polling per request at 50 µs windows.
pub(super) const MAX_BACKOFF: u32 = 256;

/// Hits in a row that clear the back-off. One hit would do for a client that is either fast or
/// slow, but nbdcopy writing over 4 connections missed about one poll in four: the hits in
/// between cleared the back-off, the connections kept polling, and on 2 vCPUs the copies ran
/// at 0.80–1.0× (median 0.95) of those without polling (0.97–1.035× with this rule). Its
/// chance of 16 hits in a row is 0.3%; fio at QD1 (0.3% misses) or with 20 µs think time
/// (2.3%) gets there most of the time.
pub(super) const RESET_AFTER_HITS: u32 = 16;

/// Per-connection busy-poll state.
#[derive(Debug)]
pub(super) struct BusyPoll {
    window: Duration,
    state: State,
    /// Quiet periods still to skip before the next probe.
    skip: u32,
    /// The last back-off: doubled by a miss, cleared by [`RESET_AFTER_HITS`] hits in a row.
    backoff: u32,
    /// Hits since the last miss.
    streak: u32,
    /// Quiet periods that polled and caught a request, polled in vain, or were skipped (also
    /// counted in the export's metrics; these are for the connection's last log line).
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Requests in flight, or the connection has not been quiet since the last one started.
    Busy,
    /// Polling since then.
    Polling(Instant),
    /// This quiet period sleeps: the window ended, or the period was skipped.
    Asleep,
}

impl BusyPoll {
    /// A zero window never polls.
    pub(super) fn new(window: Duration) -> BusyPoll {
        BusyPoll { window, state: State::Busy, skip: 0, backoff: 0, streak: 0, hits: 0, misses: 0, skipped: 0 }
    }

    pub(super) fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// A request started: a poll that was running caught it.
    pub(super) fn request_started(&mut self, m: &ExportMetrics) {
        if let State::Polling(_) = self.state {
            self.hits += 1;
            m.busy_poll(PollOutcome::Hit);
            self.streak = self.streak.saturating_add(1);
            if self.streak >= RESET_AFTER_HITS {
                self.backoff = 0;
            }
        }
        self.state = State::Busy;
    }

    /// Nothing is in flight and the connection waits for the client: true to poll (yield to
    /// the runtime and check again), false to sleep until something happens.
    pub(super) fn poll_now(&mut self, m: &ExportMetrics) -> bool {
        match self.state {
            State::Asleep => false,
            _ if !self.enabled() => false,
            State::Busy if self.skip > 0 => {
                self.skip -= 1;
                self.skipped += 1;
                m.busy_poll(PollOutcome::Skipped);
                self.state = State::Asleep;
                false
            }
            State::Busy => {
                self.state = State::Polling(Instant::now());
                true
            }
            State::Polling(since) if since.elapsed() < self.window => true,
            State::Polling(_) => {
                self.misses += 1;
                m.busy_poll(PollOutcome::Miss);
                self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
                self.streak = 0;
                self.skip = self.backoff;
                self.state = State::Asleep;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The export's counters are checked end to end (tests/ops.rs); here they only sink.
    fn m() -> ExportMetrics {
        ExportMetrics::default()
    }

    /// Quiet periods (each ended by a request) that sleep at once, until one polls.
    fn skipped_run(p: &mut BusyPoll) -> u32 {
        let mut n = 0;
        while !p.poll_now(&m()) {
            p.request_started(&m());
            n += 1;
        }
        n
    }

    /// The poll running now ends without a request.
    fn miss(p: &mut BusyPoll) {
        assert!(p.poll_now(&m()), "polling");
        std::thread::sleep(p.window + Duration::from_millis(1));
        assert!(!p.poll_now(&m()), "the window ended");
        assert!(!p.poll_now(&m()), "asleep until a request");
        p.request_started(&m());
    }

    #[test]
    fn zero_window_never_polls() {
        let mut p = BusyPoll::new(Duration::ZERO);
        for _ in 0..3 {
            assert!(!p.poll_now(&m()));
            p.request_started(&m());
        }
        assert_eq!((p.hits, p.misses, p.skipped), (0, 0, 0));
    }

    #[test]
    fn a_client_that_comes_back_in_time_is_polled_for_every_time() {
        let mut p = BusyPoll::new(Duration::from_secs(10));
        for _ in 0..100 {
            assert!(p.poll_now(&m()));
            assert!(p.poll_now(&m()));
            p.request_started(&m());
        }
        assert_eq!((p.hits, p.misses, p.skipped), (100, 0, 0));
    }

    #[test]
    fn misses_back_off_exponentially_up_to_the_bound_and_a_run_of_hits_resets() {
        // Long enough that a preempted test thread does not end a window early.
        let mut p = BusyPoll::new(Duration::from_millis(20));
        let mut expect = 1;
        for _ in 0..11 {
            miss(&mut p);
            assert_eq!(skipped_run(&mut p), expect);
            expect = (expect * 2).min(MAX_BACKOFF);
        }
        assert_eq!(expect, MAX_BACKOFF);
        assert_eq!(p.misses, 11);
        // The probe that polls now is hit, and so are the next: each quiet period polls.
        p.request_started(&m());
        for _ in 1..RESET_AFTER_HITS {
            assert!(p.poll_now(&m()));
            p.request_started(&m());
        }
        assert_eq!(p.hits, u64::from(RESET_AFTER_HITS));
        // That many hits in a row cleared the back-off: the next miss skips one period only.
        miss(&mut p);
        assert_eq!(skipped_run(&mut p), 1);
    }

    #[test]
    fn a_client_that_misses_often_backs_off_between_its_hits() {
        let mut p = BusyPoll::new(Duration::from_millis(20));
        miss(&mut p);
        assert_eq!(skipped_run(&mut p), 1);
        // Hits, then a miss before the run is long enough: the back-off doubles anyway.
        for expect in [2, 4, 8, 16] {
            p.request_started(&m());
            for _ in 0..RESET_AFTER_HITS / 2 {
                assert!(p.poll_now(&m()));
                p.request_started(&m());
            }
            miss(&mut p);
            assert_eq!(skipped_run(&mut p), expect);
        }
    }
}
