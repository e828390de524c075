//! A burst-per-window rate limit for log lines that clients can make the daemon repeat:
//! request failures that are the server's fault (per export), client connections, refused
//! connections and failed handshakes. Anyone who
//! can reach a listener could otherwise write lines at the rate they connect or fail, and use
//! up a journal's own rate limit (journald's default: 10,000 lines in 30 s per service), so
//! that the lines that matter get dropped with theirs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first `burst` events of each `window` are admitted; the count of the others is handed
/// to the first event of the next window that has one.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

/// What [`RateLimit::admit`] decided for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// Log this event in full.
    pub log: bool,
    /// This event opened a window, and the one before suppressed this many (not 0).
    pub suppressed_before: Option<u64>,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit { burst, window, state: Mutex::new(Window { start: None, admitted: 0, suppressed: 0 }) }
    }

    /// Counts one event at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut suppressed_before = None;
        if w.start.is_none_or(|s| now.saturating_duration_since(s) >= self.window) {
            suppressed_before = (w.suppressed > 0).then_some(w.suppressed);
            *w = Window { start: Some(now), admitted: 0, suppressed: 0 };
        }
        let log = w.admitted < self.burst;
        if log {
            w.admitted += 1;
        } else {
            w.suppressed += 1;
        }
        Admit { log, suppressed_before }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_the_rest() {
        let r = RateLimit::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let logged = (0..25).filter(|_| r.admit(t0).log).count();
        assert_eq!(logged, 10);
        // Still the same window.
        assert_eq!(r.admit(t0 + Duration::from_secs(59)), Admit { log: false, suppressed_before: None });
        assert_eq!(r.admit(t0 + Duration::from_secs(60)), Admit { log: true, suppressed_before: Some(16) });
        assert_eq!(r.admit(t0 + Duration::from_secs(60)), Admit { log: true, suppressed_before: None });
        // A window with nothing suppressed reports nothing.
        assert_eq!(r.admit(t0 + Duration::from_secs(200)), Admit { log: true, suppressed_before: None });
    }

    #[test]
    fn a_clock_that_goes_back_stays_in_the_window() {
        let r = RateLimit::new(1, Duration::from_secs(1));
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(r.admit(t0).log);
        assert!(!r.admit(t0 - Duration::from_secs(5)).log);
    }
}
