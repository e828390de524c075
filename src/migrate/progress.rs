//! Progress of a long operation: a one-line bar (bytes, rate, ETA) on a terminal, a log line
//! every few seconds otherwise (`NBDCRYPT_PROGRESS_SECS`, default 10).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Reports progress of `total` bytes.
#[derive(Debug)]
pub struct Progress {
    label: &'static str,
    total: u64,
    /// Bytes already done when this run started (a resumed run), excluded from the rate.
    base: Option<u64>,
    started: Instant,
    last: Option<Instant>,
    tty: bool,
    every: Duration,
}

fn human(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Progress {
        let every = std::env::var("NBDCRYPT_PROGRESS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10.0);
        Progress {
            label,
            total,
            base: None,
            started: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
            every: Duration::from_secs_f64(every),
        }
    }

    /// `done` bytes of `total` are done.
    pub fn update(&mut self, done: u64) {
        let base = *self.base.get_or_insert(done);
        let now = Instant::now();
        let interval = if self.tty { Duration::from_millis(200) } else { self.every };
        if self.last.is_some_and(|l| now - l < interval) && done < self.total {
            return;
        }
        self.last = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done.saturating_sub(base) as f64 / secs;
        let eta = if rate > 0.0 { (self.total - done.min(self.total)) as f64 / rate } else { 0.0 };
        let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
        if self.tty {
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64) as usize;
            let bar: String = "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
            eprint!(
                "\r{} [{bar}] {:>5.1}% {} / {}  {}/s  ETA {}   ",
                self.label,
                pct,
                human(done as f64),
                human(self.total as f64),
                human(rate),
                hms(eta)
            );
            let _ = std::io::stderr().flush();
        } else {
            tracing::info!(
                op = self.label,
                done,
                total = self.total,
                percent = (pct * 10.0).round() / 10.0,
                rate_mib_s = (rate / 1048576.0 * 10.0).round() / 10.0,
                eta_s = eta.round() as u64,
                "progress"
            );
        }
    }

    /// Ends the bar and logs a summary.
    pub fn finish(&mut self, done: u64) {
        self.last = None;
        self.update(done);
        if self.tty {
            eprintln!();
        }
        let secs = self.started.elapsed().as_secs_f64();
        let moved = done.saturating_sub(self.base.unwrap_or(0));
        tracing::info!(
            op = self.label,
            bytes = moved,
            seconds = (secs * 100.0).round() / 100.0,
            rate_mib_s = (moved as f64 / secs.max(1e-3) / 1048576.0 * 10.0).round() / 10.0,
            "finished"
        );
    }
}
