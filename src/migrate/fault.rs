//! Fault injection for the crash tests.
//!
//! - [`KillAfterWrites`] (any build, enabled by an environment variable only): the process
//!   SIGKILLs itself just before its N-th write to the device, for the integration tests'
//!   deterministic crash points (`NBDCRYPT_FAULT_KILL_AFTER_WRITES=N`).
//! - `CrashBackend` (tests only): an in-memory device that stops at a chosen write and then
//!   "crashes": with `CrashMode::Clean` every completed write survives (a killed process:
//!   the page cache is kept), with `CrashMode::PowerCut` each write not yet flushed is kept,
//!   lost, or torn at 512-byte granularity (a power cut on a device that only promises that
//!   flushed writes are durable and that 512-byte sectors are written atomically).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::Backend;

/// Environment variable: SIGKILL this process before its N-th device write (0-based count).
pub const ENV_KILL_AFTER_WRITES: &str = "NBDCRYPT_FAULT_KILL_AFTER_WRITES";
/// Environment variable: sleep this many milliseconds after each chunk (to give random
/// SIGKILLs from a test something to hit on small images).
pub const ENV_THROTTLE_MS: &str = "NBDCRYPT_THROTTLE_MS";

/// Wraps a backend; kills the process before write number `limit`.
#[derive(Debug)]
pub struct KillAfterWrites {
    inner: Box<dyn Backend>,
    limit: u64,
    count: AtomicU64,
}

impl KillAfterWrites {
    pub fn new(inner: Box<dyn Backend>, limit: u64) -> Self {
        KillAfterWrites { inner, limit, count: AtomicU64::new(0) }
    }
}

/// The write limit from the environment, if set.
pub fn kill_limit_from_env() -> Option<u64> {
    std::env::var(ENV_KILL_AFTER_WRITES).ok().and_then(|v| v.parse().ok())
}

/// Sleeps for the test throttle, if set.
pub fn throttle() {
    if let Some(ms) = std::env::var(ENV_THROTTLE_MS).ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

impl KillAfterWrites {
    /// Counts a write (or zeroing) and dies before the `limit`-th.
    fn before_write(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.limit {
            eprintln!("nbdcrypt: fault injection: SIGKILL before write {}", self.limit);
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        }
    }
}

impl Backend for KillAfterWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before_write();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.before_write();
        self.inner.zero_range(offset, len)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
pub(crate) use crash::{CrashBackend, CrashMode};

#[cfg(test)]
mod crash {
    use std::io;
    use std::sync::Mutex;

    use crate::backend::Backend;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum CrashMode {
        /// The process dies; completed writes survive.
        Clean,
        /// The power goes; unflushed writes are kept, lost or torn (per 512-byte sector).
        PowerCut,
    }

    #[derive(Debug)]
    struct State {
        durable: Vec<u8>,
        view: Vec<u8>,
        pending: Vec<(usize, usize)>,
        writes: u64,
        crash_at: u64,
        dead: bool,
        rng: u64,
    }

    #[derive(Debug)]
    pub(crate) struct CrashBackend {
        mode: CrashMode,
        s: Mutex<State>,
    }

    fn dead() -> io::Error {
        io::Error::other("simulated crash")
    }

    impl CrashBackend {
        /// A device that fails (the process "dies") at write number `crash_at` (0-based).
        pub(crate) fn new(crash_at: u64, mode: CrashMode, seed: u64) -> Self {
            let s = State {
                durable: Vec::new(),
                view: Vec::new(),
                pending: Vec::new(),
                writes: 0,
                crash_at,
                dead: false,
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            };
            CrashBackend { mode, s: Mutex::new(s) }
        }

        pub(crate) fn load(&self, bytes: &[u8]) {
            let mut s = self.s.lock().unwrap();
            s.durable = bytes.to_vec();
            s.view = bytes.to_vec();
        }

        pub(crate) fn writes(&self) -> u64 {
            self.s.lock().unwrap().writes
        }

        /// Applies the crash to the writes not yet flushed; the device works again afterwards.
        pub(crate) fn crash(&self) {
            let mut s = self.s.lock().unwrap();
            let pending = std::mem::take(&mut s.pending);
            let mut durable = s.durable.clone();
            for (off, len) in pending {
                match self.mode {
                    CrashMode::Clean => durable[off..off + len].copy_from_slice(&s.view[off..off + len]),
                    CrashMode::PowerCut => {
                        for sec in (off..off + len).step_by(512) {
                            s.rng ^= s.rng << 13;
                            s.rng ^= s.rng >> 7;
                            s.rng ^= s.rng << 17;
                            if s.rng.is_multiple_of(3) {
                                let end = (sec + 512).min(off + len);
                                durable[sec..end].copy_from_slice(&s.view[sec..end]);
                            }
                        }
                    }
                }
            }
            s.view = durable.clone();
            s.durable = durable;
            s.dead = false;
        }

        /// Arms another crash `after` writes from now; returns true.
        pub(crate) fn rearm(&self, after: u64) -> bool {
            let mut s = self.s.lock().unwrap();
            s.crash_at = s.writes + after;
            true
        }

        pub(crate) fn disarm(&self) {
            self.s.lock().unwrap().crash_at = u64::MAX;
        }
    }

    impl Backend for CrashBackend {
        fn size(&self) -> u64 {
            self.s.lock().unwrap().view.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let s = self.s.lock().unwrap();
            if s.dead {
                return Err(dead());
            }
            let o = offset as usize;
            let src = s.view.get(o..o + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut s = self.s.lock().unwrap();
            if s.dead || s.writes >= s.crash_at {
                s.dead = true;
                return Err(dead());
            }
            s.writes += 1;
            let o = offset as usize;
            s.view.get(o..o + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
            s.view[o..o + buf.len()].copy_from_slice(buf);
            s.pending.push((o, buf.len()));
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            let mut s = self.s.lock().unwrap();
            if s.dead {
                return Err(dead());
            }
            let pending = std::mem::take(&mut s.pending);
            let State { durable, view, .. } = &mut *s;
            for (off, len) in pending {
                durable[off..off + len].copy_from_slice(&view[off..off + len]);
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "crash-test memory".into()
        }
    }
}
