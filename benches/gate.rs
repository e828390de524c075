//! What the suspend gate costs on the hot path: a 4 KiB sector-cipher call through
//! [`CipherGate`] against the same call on the bare [`SectorCipher`], on one thread and on two
//! threads sharing one cipher (as the blocking pool does). Alternating short slices, best of
//! many rounds, as in `benches/xts.rs`. Run with `cargo bench --bench gate`.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdcrypt::crypto::{CipherGate, SectorCipher, VolumeKey};
use nbdcrypt::units::{SectorIndex, SectorSize};

const ROUNDS: usize = 25;
const SLICE: Duration = Duration::from_millis(20);
const REQUEST: usize = 4096;

/// Calls per second of `f` over one slice.
fn rate(f: &dyn Fn(&mut [u8])) -> f64 {
    let mut buf = vec![7u8; REQUEST];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < SLICE {
        for _ in 0..64 {
            f(black_box(&mut buf));
        }
        n += 64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Best per-call time (ns) of `bare` and `gated` on `threads` threads, alternating slices.
fn measure(threads: usize, bare: Arc<SectorCipher>, gated: Arc<CipherGate>) -> (f64, f64) {
    let (mut best_bare, mut best_gated) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        for which in [0, 1] {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (b, g) = (bare.clone(), gated.clone());
                    std::thread::spawn(move || {
                        if which == 0 {
                            rate(&|buf| b.encrypt(SectorIndex(9), buf).unwrap())
                        } else {
                            rate(&|buf| g.encrypt(SectorIndex(9), buf).unwrap())
                        }
                    })
                })
                .collect();
            let total: f64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            if which == 0 {
                best_bare = best_bare.max(total);
            } else {
                best_gated = best_gated.max(total);
            }
        }
    }
    (1e9 * threads as f64 / best_bare, 1e9 * threads as f64 / best_gated)
}

fn main() {
    let key = VolumeKey::generate().unwrap();
    let bare = Arc::new(SectorCipher::new(&key, SectorSize::S4096).unwrap());
    let gated = Arc::new(CipherGate::new(SectorCipher::new(&key, SectorSize::S4096).unwrap()));
    println!("4 KiB encrypt, ns per call (best of {ROUNDS} x {SLICE:?} slices)");
    println!("{:>8} {:>10} {:>10} {:>10}", "threads", "bare", "gated", "overhead");
    for threads in [1, 2] {
        let (b, g) = measure(threads, bare.clone(), gated.clone());
        println!("{threads:>8} {b:>10.1} {g:>10.1} {:>9.1}%", (g / b - 1.0) * 100.0);
    }
}
