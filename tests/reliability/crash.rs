//! Crash consistency (issue 8, item 1): a write workload with FLUSH and FUA on several
//! connections, crashed at random moments, then checked against the model of
//! `tests/py/crash.py` (read its docstring for the invariants).
//!
//! - SIGKILL: the real daemon on a Unix socket, killed and restarted on the same volume file.
//!   The page cache survives, so every acknowledged write must survive.
//! - Power cut: the in-process server over a [`FaultBackend`], whose volatile cache loses all,
//!   none or a random subset (per encryption sector) of the writes since the last flush; a
//!   new export is opened on what the medium kept. Every write acknowledged before an
//!   acknowledged FLUSH, and every acknowledged FUA write, must survive. Driven through NBD
//!   (libnbd, several connections), not by calling the export directly.

use std::sync::Arc;
use std::time::Duration;

use nbdcrypt::backend::fault::{CutMode, FaultBackend, FaultPlan, FaultStats};
use nbdcrypt::crypto::{SectorCipher, VolumeKey};
use nbdcrypt::export::{Export, ExportOptions, Geometry};
use nbdcrypt::units::SectorSize;

use crate::common::Volume;
use crate::harness::*;

const PEER_TIMEOUT: Duration = Duration::from_secs(300);

enum Event {
    Crash,
    Restart,
}

/// Figures of the SIGKILL or power-cut runs: the peer's totals plus the driver's own.
struct Driver {
    peer: Peer,
    totals: serde_json::Map<String, serde_json::Value>,
    summary: serde_json::Value,
}

impl Driver {
    fn new(mode: &str, sector: u32, rounds: u64, seed: u64, uri: &str, dir: &std::path::Path) -> Driver {
        let args: Vec<String> = [
            "--uri",
            uri,
            "--sector",
            &sector.to_string(),
            "--mode",
            mode,
            "--rounds",
            &rounds.to_string(),
            "--seed",
            &seed.to_string(),
            "--artifacts",
            &dir.join("artifacts").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Driver { peer: Peer::spawn("crash.py", &args, dir), totals: Default::default(), summary: Default::default() }
    }

    /// Runs the protocol: `on(Crash)` while the workload runs, `on(Restart)` once it drained.
    fn run(&mut self, mut on: impl FnMut(Event)) {
        loop {
            let line = self.peer.recv(PEER_TIMEOUT);
            let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
            match word {
                "GO" => {
                    on(Event::Crash);
                    self.peer.send("CRASHED");
                }
                "DRAINED" => {
                    on(Event::Restart);
                    self.peer.send("READY");
                }
                "ROUND" => {
                    let (_, json) = rest.split_once(' ').unwrap();
                    add_json(&mut self.totals, &serde_json::from_str(json).unwrap());
                }
                "SUMMARY" => {
                    self.summary = serde_json::from_str(rest).unwrap();
                    break;
                }
                other => panic!("unexpected line from crash.py: {other:?}"),
            }
        }
    }
}

/// A crash moment: mostly while the workload runs (it issues for a few hundred ms), now and
/// then right at its start.
fn crash_delay(rng: &mut Rng) -> Duration {
    if rng.below(10) == 0 {
        Duration::from_millis(rng.below(5))
    } else {
        Duration::from_millis(5 + rng.below(400))
    }
}

fn sigkill_rounds(sector: u32) {
    let rounds = knob("NBDCRYPT_CRASH_ROUNDS", 20, 1000);
    let seed = knob("NBDCRYPT_SEED", 1, 1) + u64::from(sector);
    let vol = Volume::new(8 << 20, sector);
    let sock = vol.path("nbd.sock");
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let mut restarts = 0u64;
    let start = |n: u64| {
        let log = vol.path(&format!("daemon-{}.log", n % 2));
        DaemonProc::start(&vol.image, &vol.kek, &sock, &log, "info", &[])
    };
    let mut daemon = Some(start(0));
    let mut rng = Rng(seed);
    let mut driver = Driver::new("kill", sector, rounds, seed, &uri, vol.dir.path());
    let mut kills = 0u64;
    let started = std::time::Instant::now();
    driver.run(|ev| match ev {
        Event::Crash => {
            std::thread::sleep(crash_delay(&mut rng));
            daemon.as_mut().unwrap().kill9();
            kills += 1;
        }
        Event::Restart => {
            restarts += 1;
            daemon = Some(start(restarts));
        }
    });
    driver.peer.finish();
    let mut out = driver.summary.clone();
    out["sector_size"] = sector.into();
    out["sigkills"] = kills.into();
    out["seed"] = seed.into();
    out["seconds"] = started.elapsed().as_secs().into();
    record(&format!("crash-sigkill-{sector}"), &out);
    assert_eq!(out["data_lost"], 0);
    assert_eq!(out["rounds"], rounds);
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write_4096() {
    sigkill_rounds(4096);
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write_512() {
    sigkill_rounds(512);
}

const DATA_OFFSET: u64 = 4096;
const DATA_SIZE: u64 = 6 << 20;

fn fault_export(key: &VolumeKey, ss: SectorSize, image: Vec<u8>, seed: u64) -> (Arc<FaultBackend>, Arc<Export>) {
    // Whole encryption sectors are the disk's atomic unit (see the FaultBackend docs).
    let fault = Arc::new(FaultBackend::new(image, ss.bytes_usize(), seed));
    let opts = ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: false };
    let geo = Geometry { sector_size: ss, data_offset: DATA_OFFSET, data_size: DATA_SIZE };
    let export = Arc::new(Export::new(opts, geo, fault.clone(), SectorCipher::new(key, ss).unwrap()));
    (fault, export)
}

pub fn stats_json(s: &FaultStats) -> serde_json::Value {
    serde_json::json!({
        "reads": s.reads, "writes": s.writes, "flushes": s.flushes,
        "read_eio": s.read_eio, "read_short": s.read_short, "write_eio": s.write_eio,
        "write_short": s.write_short, "write_enospc": s.write_enospc, "flush_eio": s.flush_eio,
        "writes_lost_by_failed_flush": s.writes_lost_by_failed_flush, "power_cuts": s.power_cuts,
        "units_kept_latest": s.units_kept_latest, "units_kept_older": s.units_kept_older,
        "units_dropped": s.units_dropped,
    })
}

/// Power cuts under the in-process server; with `flush_eio` (parts per million) flushes fail
/// now and then too, with Linux's semantics (the failed flush's writes are lost for good).
fn power_cut_rounds(ss: SectorSize, flush_eio: u32, name: &str) {
    let rounds = knob("NBDCRYPT_CRASH_ROUNDS", 20, 1000);
    let seed = knob("NBDCRYPT_SEED", 1, 1) + u64::from(ss.bytes()) + u64::from(flush_eio);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let key = VolumeKey::generate().unwrap();
    let mut rng = Rng(seed);
    let plan = FaultPlan { flush_eio, flush_eio_return_us: 300, flush_us: 200, ..Default::default() };
    let (fault, export) = fault_export(&key, ss, vec![0u8; (DATA_OFFSET + DATA_SIZE) as usize], rng.next());
    fault.set_faults(plan);
    let mut fault = Some(fault);
    let mut image = Vec::new();
    let mut server = InProcess::new();
    server.start(export, &sock);
    let mut faults = serde_json::Map::new();
    let mut modes = [0u64; 3];
    let mut driver = Driver::new("powercut", ss.bytes(), rounds, seed, &uri, dir.path());
    let started = std::time::Instant::now();
    let mut seeds = Rng(seed ^ 0x5eed);
    driver.run(|ev| match ev {
        Event::Crash => {
            std::thread::sleep(crash_delay(&mut rng));
            let m = rng.below(5);
            let mode = match m {
                0 => CutMode::DropAll,
                1 => CutMode::KeepAll,
                _ => CutMode::Random,
            };
            modes[m.min(2) as usize] += 1;
            let f = fault.take().unwrap();
            image = f.power_cut(mode);
            add_json(&mut faults, &stats_json(&f.stats()));
        }
        Event::Restart => {
            server.stop();
            let (f, e) = fault_export(&key, ss, std::mem::take(&mut image), seeds.next());
            f.set_faults(plan);
            fault = Some(f);
            server.start(e, &sock);
        }
    });
    driver.peer.finish();
    server.stop();
    let mut out = driver.summary.clone();
    out["sector_size"] = ss.bytes().into();
    out["seed"] = seed.into();
    out["seconds"] = started.elapsed().as_secs().into();
    out["cuts_drop_all"] = modes[0].into();
    out["cuts_keep_all"] = modes[1].into();
    out["cuts_random"] = modes[2].into();
    out["disk"] = faults.into();
    record(name, &out);
    assert_eq!(out["data_lost"], 0);
    assert_eq!(out["rounds"], rounds);
}

#[test]
fn power_cut_keeps_every_flushed_and_fua_write_4096() {
    power_cut_rounds(SectorSize::S4096, 0, "crash-powercut-4096");
}

#[test]
fn power_cut_keeps_every_flushed_and_fua_write_512() {
    power_cut_rounds(SectorSize::S512, 0, "crash-powercut-512");
}

/// A flush that fails (EIO) loses its writes for good; the next flush must not claim them.
#[test]
fn power_cut_after_failed_flushes_keeps_every_acknowledged_flush_honest() {
    power_cut_rounds(SectorSize::S4096, 30_000, "crash-powercut-flush-eio-4096");
}
