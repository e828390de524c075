//! Throughput of [`SectorCipher`] on each engine against AWS-LC's `EVP_aes_256_xts` called
//! directly: on the AWS-LC engine the ratio is what the safe wrapper (checks, context pool)
//! costs, on the wide engine (VAES/AVX-512, where the CPU has it) what our own XTS gains.
//! Target: the engine `SectorCipher::new` picks (marked `*`) ≥ 0.9× direct.
//!
//! The direct path does the same work the AWS-LC wrapper must do: one context created up
//! front, then per sector an IV (tweak) re-init and an in-place `Update`. For each sector size
//! (512, 4096), engine and request size (4 KiB, 64 KiB, 1 MiB) the two are measured in
//! alternating short time slices, many rounds, and the best slice of each is reported: on a
//! shared machine other load only ever slows a slice down, and alternating exposes both paths
//! to the same drift.
//!
//! A second table runs two threads at once: both sharing one `SectorCipher` (on AWS-LC, its
//! context pool under contention) against each thread owning its own EVP context (the
//! contention-free ideal). No criterion, to keep compile time down; run with
//! `cargo bench --bench xts`.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::hint::black_box;
use std::ptr;
use std::time::{Duration, Instant};

use aws_lc_sys as ffi;
use nbdcrypt::crypto::{CipherEngine, SectorCipher, VolumeKey};
use nbdcrypt::units::{SectorIndex, SectorSize};

/// Alternating measurement rounds per configuration.
const ROUNDS: usize = 25;
/// Length of one measurement slice.
const SLICE: Duration = Duration::from_millis(20);
const REQUESTS: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];
const SIZES: [SectorSize; 2] = [SectorSize::S512, SectorSize::S4096];

/// AWS-LC XTS without the wrapper: one encrypt and one decrypt context, keyed once.
struct Direct {
    enc: *mut ffi::EVP_CIPHER_CTX,
    dec: *mut ffi::EVP_CIPHER_CTX,
    ss: usize,
}

impl Direct {
    fn new(key: &VolumeKey, size: SectorSize) -> Direct {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; NULL is checked below. The key
        // pointer is valid for the 64 bytes EVP_aes_256_xts reads; NULL engine and IV are
        // allowed.
        unsafe {
            let enc = ffi::EVP_CIPHER_CTX_new();
            let dec = ffi::EVP_CIPHER_CTX_new();
            assert!(!enc.is_null() && !dec.is_null(), "EVP_CIPHER_CTX_new");
            let k = key.expose().as_ptr();
            let cipher = ffi::EVP_aes_256_xts();
            assert_eq!(ffi::EVP_EncryptInit_ex(enc, cipher, ptr::null_mut(), k, ptr::null()), 1);
            assert_eq!(ffi::EVP_DecryptInit_ex(dec, cipher, ptr::null_mut(), k, ptr::null()), 1);
            Direct { enc, dec, ss: size.bytes_usize() }
        }
    }

    fn encrypt(&mut self, first: u64, buf: &mut [u8]) {
        let len = self.ss as c_int;
        for (i, sector) in buf.chunks_exact_mut(self.ss).enumerate() {
            let tweak = SectorIndex(first + i as u64).tweak();
            let p = sector.as_mut_ptr();
            let mut out_len: c_int = 0;
            // SAFETY: `enc` is a live context keyed for encryption; `tweak` is 16 bytes; `p`
            // points to `len` writable bytes (in place is allowed for XTS).
            unsafe {
                let ok = ffi::EVP_EncryptInit_ex(self.enc, ptr::null(), ptr::null_mut(), ptr::null(), tweak.as_ptr());
                let ok = ok & ffi::EVP_EncryptUpdate(self.enc, p, &mut out_len, p, len);
                assert_eq!(ok, 1, "EVP encrypt");
            }
        }
    }

    fn decrypt(&mut self, first: u64, buf: &mut [u8]) {
        let len = self.ss as c_int;
        for (i, sector) in buf.chunks_exact_mut(self.ss).enumerate() {
            let tweak = SectorIndex(first + i as u64).tweak();
            let p = sector.as_mut_ptr();
            let mut out_len: c_int = 0;
            // SAFETY: as in `encrypt`, with the decryption context.
            unsafe {
                let ok = ffi::EVP_DecryptInit_ex(self.dec, ptr::null(), ptr::null_mut(), ptr::null(), tweak.as_ptr());
                let ok = ok & ffi::EVP_DecryptUpdate(self.dec, p, &mut out_len, p, len);
                assert_eq!(ok, 1, "EVP decrypt");
            }
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // SAFETY: both contexts came from EVP_CIPHER_CTX_new and are freed once, here.
        unsafe {
            ffi::EVP_CIPHER_CTX_free(self.enc);
            ffi::EVP_CIPHER_CTX_free(self.dec);
        }
    }
}

/// Runs `f` (which processes `bytes` per call) for one slice; returns bytes per second.
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        // Check the clock every 16 calls so it costs nothing next to a 4 KiB call.
        for _ in 0..16 {
            f();
        }
        calls += 16;
        let elapsed = start.elapsed();
        if elapsed >= SLICE {
            return (calls * bytes as u64) as f64 / elapsed.as_secs_f64();
        }
    }
}

fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

fn main() {
    let key = VolumeKey::generate().expect("key");
    println!("AES-256-XTS-plain64, single thread, best of {ROUNDS} alternating {SLICE:?} slices (GB/s = 1e9 B/s)");
    println!("wrap = SectorCipher on the engine named (* = the one SectorCipher::new picks here)");
    println!(
        "{:>6} {:>8} {:>13} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "sector", "request", "engine", "enc wrap", "enc EVP", "ratio", "dec wrap", "dec EVP", "ratio"
    );
    let mut engines = vec![CipherEngine::AwsLc];
    if CipherEngine::wide_supported() {
        engines.push(CipherEngine::Wide);
    }
    for size in SIZES {
        for &engine in &engines {
            let cipher = SectorCipher::with_engine(&key, size, engine).expect("cipher");
            let label = format!("{engine}{}", if engine == CipherEngine::preferred() { "*" } else { "" });
            table_rows(&key, size, &cipher, &label);
        }
    }

    println!();
    two_thread_table(&key);
}

/// One row per request size: `cipher` against EVP directly, alternating.
fn table_rows(key: &VolumeKey, size: SectorSize, cipher: &SectorCipher, label: &str) {
    let mut direct = Direct::new(key, size);
    {
        for request in REQUESTS {
            let mut buf = vec![0x5Au8; request];
            let first = 1u64 << 20;
            let mut r = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..ROUNDS {
                r[0].push(rate(request, || {
                    cipher.encrypt(SectorIndex(first), black_box(&mut buf)).expect("encrypt");
                }));
                r[1].push(rate(request, || direct.encrypt(first, black_box(&mut buf))));
                r[2].push(rate(request, || {
                    cipher.decrypt(SectorIndex(first), black_box(&mut buf)).expect("decrypt");
                }));
                r[3].push(rate(request, || direct.decrypt(first, black_box(&mut buf))));
            }
            let [ew, ed, dw, dd] = r.map(|v| best(v) / 1e9);
            println!(
                "{:>6} {:>8} {label:>13} | {ew:>9.2} {ed:>9.2} {:>6.3} | {dw:>9.2} {dd:>9.2} {:>6.3}",
                size.bytes(),
                human(request),
                ew / ed,
                dw / dd
            );
        }
    }
}

/// Two threads at once: the contention of a shared cipher against the ideal.
fn two_thread_table(key: &VolumeKey) {
    println!("encrypt from 2 threads: one shared SectorCipher vs one EVP context per thread");
    println!("{:>6} {:>8} | {:>9} {:>9} {:>6}", "sector", "request", "enc wrap", "enc EVP", "ratio");
    for size in SIZES {
        let cipher = SectorCipher::new(key, size).expect("cipher");
        for request in [4 << 10, 64 << 10] {
            let (mut w, mut d) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS / 2 {
                w.push(two_threads(|t| {
                    let mut buf = vec![0x5Au8; request];
                    rate(request, || {
                        cipher.encrypt(SectorIndex(t << 30), black_box(&mut buf)).expect("encrypt");
                    })
                }));
                d.push(two_threads(|t| {
                    let mut direct = Direct::new(key, size);
                    let mut buf = vec![0x5Au8; request];
                    rate(request, || direct.encrypt(t << 30, black_box(&mut buf)))
                }));
            }
            let (w, d) = (best(w) / 1e9, best(d) / 1e9);
            println!("{:>6} {:>8} | {w:>9.2} {d:>9.2} {:>6.3}", size.bytes(), human(request), w / d);
        }
    }
}

/// Runs `work(thread number)` on two threads at once; returns the sum of their rates.
fn two_threads(work: impl Fn(u64) -> f64 + Sync) -> f64 {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let work = &work;
                s.spawn(move || work(t))
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    })
}
