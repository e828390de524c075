//! Connection threads: one single-threaded runtime per core, each connection on one of them
//! for its whole life.
//!
//! Why not the process's work-stealing runtime: on this kind of machine (a small VM) waking
//! a thread on another core costs about 20 µs of CPU, and a connection served by a
//! work-stealing pool wakes the other worker and moves between workers all the time (about 7
//! context switches per MiB of 1 MiB writes over TCP). Pinned to one thread, a busy
//! connection's thread and its client each keep a core and rarely sleep (0.4 per MiB), so a
//! large write over TCP can be received, encrypted and copied into the page cache on one
//! core, while the data is in that core's cache (over a Unix socket large writes still go to
//! the pool: see `nbd::transmission::Transport`). Several connections spread over the threads
//! (fewest connections first), so multi-conn still scales across cores; work that may wait
//! still goes to a blocking pool (each runtime has its own; writes too while the volume holds
//! them up: `export::backpressure`).
//!
//! Each blocking pool is capped ([`IO_THREADS_PER_THREAD`] by default). With tokio's default,
//! 512 threads per runtime, a deep queue of device I/O started a thread per request, each put
//! to sleep and woken for its one request. With `--direct` on this machine's virtio disk, 4 KiB
//! random reads at QD128 from 4 connections ran 580–1030 threads and made 40,000–73,000 per
//! second (10 runs); capped at 16 per connection thread (38 threads in all), 74,000–91,000
//! (8 runs, and one of 146,000; 32: 84,000–94,000, 64: 78,000–82,000), with 1.7 context
//! switches per request instead of 3.5, and less CPU. One connection at QD128: 47,000–49,000
//! against 91,000; random writes 9,000–39,000 against 26,000–46,000. A device whose latency
//! needs more I/O in flight than that gets it from `--io-threads`.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Blocking-pool threads per connection thread, unless `--io-threads` says otherwise.
pub const IO_THREADS_PER_THREAD: usize = 16;

/// The connection threads. Dropping it stops them (once their connections have ended: the
/// server waits for those first).
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// Blocking-pool threads per connection thread, at most.
    io_threads: usize,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Connections on this thread.
    load: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` (at least one) threads, each with a blocking pool of at most `io_threads`
    /// (at least one) threads.
    pub fn start(n: usize, io_threads: usize) -> io::Result<Workers> {
        let io_threads = io_threads.max(1);
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(io_threads)
                // Tells them apart from the main runtime's in `top -H` (and in tests).
                .thread_name(format!("nbdcrypt-io-{i}"))
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new().name(format!("nbdcrypt-conn-{i}")).spawn(move || {
                // Tasks on a current-thread runtime run while this thread is inside block_on.
                let _ = rt.block_on(stopped);
            })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers, io_threads })
    }

    /// One thread per CPU this process may use (affinity and cgroup quota included), sharing
    /// `io_threads` blocking threads evenly (rounded up; default [`IO_THREADS_PER_THREAD`]
    /// each).
    pub fn per_core(io_threads: Option<usize>) -> io::Result<Workers> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Workers::start(n, per_thread(io_threads, n))
    }

    /// Connection threads.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Blocking-pool threads over all connection threads, at most.
    pub fn io_threads(&self) -> usize {
        self.io_threads * self.workers.len()
    }

    /// Runs the future that `make` builds on the thread with the fewest connections. `make`
    /// runs on that thread, inside its runtime: the place to register a socket with it
    /// (`from_std`).
    pub fn spawn<M, F>(&self, make: M)
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(w) = self.workers.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)) else { return };
        let load = Load::new(w.load.clone());
        w.handle.spawn(async move {
            let _load = load;
            make().await;
        });
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Each of `n` connection threads' share of `total` blocking threads.
fn per_thread(total: Option<usize>, n: usize) -> usize {
    total.map_or(IO_THREADS_PER_THREAD, |t| t.div_ceil(n.max(1))).max(1)
}

/// Counts a connection on its thread until dropped.
#[derive(Debug)]
struct Load(Arc<AtomicUsize>);

impl Load {
    fn new(c: Arc<AtomicUsize>) -> Load {
        c.fetch_add(1, Ordering::Relaxed);
        Load(c)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::HashMap;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Spawns a connection stand-in that reports its thread and waits for `release`.
    fn hold(w: &Workers, seen: &mpsc::Sender<std::thread::ThreadId>, release: &tokio::sync::watch::Receiver<bool>) {
        let (seen, mut release) = (seen.clone(), release.clone());
        w.spawn(move || async move {
            seen.send(std::thread::current().id()).unwrap();
            let _ = release.wait_for(|r| *r).await;
        });
    }

    #[test]
    fn connections_spread_evenly_and_stay_on_their_thread() {
        let w = Workers::start(2, 4).unwrap();
        assert_eq!(w.workers.len(), 2);
        let (seen_tx, seen) = mpsc::channel();
        let (release_tx, release) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            hold(&w, &seen_tx, &release);
        }
        let mut per_thread: HashMap<std::thread::ThreadId, usize> = HashMap::new();
        for _ in 0..4 {
            *per_thread.entry(seen.recv_timeout(Duration::from_secs(10)).unwrap()).or_default() += 1;
        }
        assert_eq!(per_thread.len(), 2, "{per_thread:?}");
        assert!(per_thread.values().all(|&n| n == 2), "{per_thread:?}");
        assert!(!per_thread.contains_key(&std::thread::current().id()));
        release_tx.send(true).unwrap();
        // Dropping joins the threads: it returns once they have stopped.
        drop(w);
    }

    #[test]
    fn a_given_total_of_io_threads_is_shared_rounding_up() {
        assert_eq!(per_thread(None, 2), IO_THREADS_PER_THREAD);
        assert_eq!(per_thread(Some(5), 2), 3);
        assert_eq!(per_thread(Some(1), 4), 1);
        assert_eq!(per_thread(Some(64), 0), 64);
    }

    #[test]
    fn the_blocking_pool_runs_at_most_its_cap_at_once() {
        let w = Workers::start(1, 3).unwrap();
        assert_eq!(w.io_threads(), 3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (done_tx, done) = mpsc::channel();
        let (r, m) = (running.clone(), most.clone());
        w.spawn(move || async move {
            let jobs: Vec<_> = (0..9)
                .map(|_| {
                    let (r, m) = (r.clone(), m.clone());
                    tokio::task::spawn_blocking(move || {
                        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        r.fetch_sub(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for j in jobs {
                j.await.unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done.recv_timeout(Duration::from_secs(30)).unwrap();
        // Never more than the cap; and the jobs did overlap (nine 100 ms sleeps on three
        // threads), so the cap is what held them back, not a pool of one.
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_finished_connection_frees_its_place() {
        let w = Workers::start(2, 4).unwrap();
        let (seen_tx, seen) = mpsc::channel();
        let (release_tx, release) = tokio::sync::watch::channel(false);
        hold(&w, &seen_tx, &release);
        let first = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        release_tx.send(true).unwrap();
        // Once the first has ended, both threads are empty again: two new connections take
        // one thread each.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.workers.iter().any(|w| w.load.load(Ordering::Relaxed) != 0) {
            assert!(std::time::Instant::now() < deadline, "the load never dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (release_tx, release) = tokio::sync::watch::channel(false);
        hold(&w, &seen_tx, &release);
        hold(&w, &seen_tx, &release);
        let a = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        let b = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(a, b);
        assert!(a == first || b == first);
        release_tx.send(true).unwrap();
    }
}
