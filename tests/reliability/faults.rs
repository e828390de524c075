//! Faults of the raw volume (issue 8, item 2): the client gets an NBD error for the request
//! that hit the fault, the daemon keeps serving, counts the error, logs it at debug, and never
//! answers success for data that was not written.
//!
//! - Injected: EIO on read and write, short reads and writes, ENOSPC, from a [`FaultBackend`]
//!   under the in-process server, driven by `tests/py/faults.py` (libnbd, four connections).
//! - Real: ENOSPC from a sparse volume file on a full tmpfs; a real short write (RLIMIT_FSIZE
//!   makes pwrite stop at the limit, then fail with EFBIG); a real short read (the volume
//!   file truncated under the daemon). These run the real daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nbdcrypt::backend::fault::{FaultBackend, FaultPlan};
use nbdcrypt::crypto::{SectorCipher, VolumeKey};
use nbdcrypt::export::{Export, ExportOptions, Geometry};
use nbdcrypt::units::SectorSize;

use crate::common::{check, nbdcrypt, Volume};
use crate::crash::stats_json;
use crate::harness::*;

fn injected_faults(ss: SectorSize) {
    let ops = knob("NBDCRYPT_FAULT_OPS", 4000, 40000);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let (data_offset, data_size) = (8192u64, 4u64 << 20);
    let fault = Arc::new(FaultBackend::new(vec![0u8; (data_offset + data_size) as usize], ss.bytes_usize(), 42));
    let key = VolumeKey::generate().unwrap();
    let opts = ExportOptions { name: "t".into(), description: String::new(), read_only: false, allow_discards: false };
    let geo = Geometry { sector_size: ss, data_offset, data_size };
    let export = Arc::new(Export::new(opts, geo, fault.clone(), SectorCipher::new(&key, ss).unwrap()));
    let mut server = InProcess::new();
    server.start(export.clone(), &sock);
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let args: Vec<String> =
        ["--uri", &uri, "--sector", &ss.bytes().to_string(), "--ops", &ops.to_string(), "--seed", "8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut peer = Peer::spawn("faults.py", &args, dir.path());
    let t = Duration::from_secs(300);
    assert_eq!(peer.recv(t), "START");
    let plan = FaultPlan {
        read_eio: 15_000,
        read_short: 15_000,
        write_eio: 15_000,
        write_short: 15_000,
        write_enospc: 10_000,
        ..Default::default()
    };
    fault.set_faults(plan);
    let errors_before = export.io_errors();
    peer.send("GO");
    let line = peer.recv(t);
    let faulty: serde_json::Value = serde_json::from_str(line.strip_prefix("FAULTY ").unwrap()).unwrap();
    fault.set_faults(FaultPlan::default());
    let injected = fault.stats();
    let counted = export.io_errors() - errors_before;
    peer.send("CLEAN");
    let line = peer.recv(t);
    let summary: serde_json::Value = serde_json::from_str(line.strip_prefix("SUMMARY ").unwrap()).unwrap();
    peer.finish();
    server.stop();
    let mut out = summary.clone();
    out["sector_size"] = ss.bytes().into();
    out["injected"] = injected.injected().into();
    out["disk"] = stats_json(&injected);
    out["export_io_errors"] = counted.into();
    record(&format!("faults-injected-{}", ss.bytes()), &out);
    // Every fault failed exactly one request (a request stops at its first failed call), and
    // each of those is counted by the export and seen by the client, with the right errno.
    assert!(injected.injected() > 20, "too few faults to mean anything: {injected:?}");
    assert_eq!(faulty["errors"], injected.injected(), "client errors vs injected faults");
    assert_eq!(counted, injected.injected(), "export error counter vs injected faults");
    assert_eq!(faulty["enospc"], injected.write_enospc);
    assert_eq!(export.io_errors() - errors_before, counted, "no errors once the faults stopped");
}

#[test]
fn injected_eio_short_io_and_enospc_fail_only_their_request_4096() {
    injected_faults(SectorSize::S4096);
}

#[test]
fn injected_eio_short_io_and_enospc_fail_only_their_request_512() {
    injected_faults(SectorSize::S512);
}

/// Runs `faults_real.py`, returning its JSON line; panics with its stderr on failure.
fn scenario(args: &[&str]) -> serde_json::Value {
    let out = Command::new(PYTHON).arg(script("faults_real.py")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "faults_real.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The daemon's JSON log lines whose message is `msg`.
fn log_events(log: &str, msg: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == msg)
        .collect()
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs failed (the test needs root)");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn enospc_from_a_full_filesystem_fails_the_write_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "24m");
    let image = fs.0.join("vol.img");
    let kek = dir.path().join("vol.kek");
    check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap(); // sparse: bigger than the fs
    let key = format!("local:{}", kek.display());
    check(nbdcrypt(&["format", image.to_str().unwrap(), "--key", &key]), "format");
    let sock = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let d = DaemonProc::start(&image, &kek, &sock, &dir.path().join("d1.log"), "debug", &[]);
    let r = scenario(&["enospc", &uri]);
    let n = r["chunks_acked"].as_u64().unwrap();
    assert!((10..=24).contains(&n), "{r}");
    assert!(d.stop().success());
    let log = std::fs::read_to_string(dir.path().join("d1.log")).unwrap();
    let failed = log_events(&log, "request failed");
    assert!(failed.iter().any(|e| e["errno"] == 28), "no debug line for ENOSPC:\n{log}");
    let closing = log_events(&log, "export closing");
    assert_eq!(closing.last().unwrap()["io_errors"], r["enospc_errors"], "{log}");
    // Acknowledged data survives a restart on the full filesystem.
    let d = DaemonProc::start(&image, &kek, &sock, &dir.path().join("d2.log"), "debug", &[]);
    scenario(&["verify-chunks", &uri, &n.to_string()]);
    assert!(d.stop().success());
    record("faults-enospc", &r);
    drop(fs);
}

#[test]
fn a_short_write_at_the_file_size_limit_fails_the_request() {
    let vol = Volume::new(16 << 20, 4096);
    let sock = vol.path("nbd.sock");
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    // Not sector-aligned: the write across it is cut in the middle of a sector.
    let limit = ((2 + 6) << 20) + 1000;
    // bash ignores SIGXFSZ (inherited through exec), prlimit sets the limit and execs the daemon.
    let wrap = ["bash", "-c", "trap '' XFSZ; exec prlimit --fsize=$0:$0 -- \"$@\"", &limit.to_string()];
    let log = vol.path("d.log");
    let d = DaemonProc::start(&vol.image, &vol.kek, &sock, &log, "debug", &wrap);
    let r = scenario(&["short-write", &uri, &limit.to_string()]);
    assert!(d.stop().success(), "the daemon must survive EFBIG");
    let text = std::fs::read_to_string(&log).unwrap();
    let failed = log_events(&text, "request failed");
    assert_eq!(failed.len(), 2, "{text}");
    assert!(
        failed.iter().all(|e| e["errno"] == 5 && e["error"].as_str().unwrap().contains("File too large")),
        "{text}"
    );
    assert_eq!(log_events(&text, "export closing")[0]["io_errors"], 2);
    record("faults-short-write", &r);
}

#[test]
fn a_short_read_past_a_truncated_volume_fails_the_request() {
    let vol = Volume::new(8 << 20, 4096);
    let sock = vol.path("nbd.sock");
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let log = vol.path("d.log");
    let d = DaemonProc::start(&vol.image, &vol.kek, &sock, &log, "debug", &[]);
    scenario(&["fill", &uri, "5"]);
    let eof = ((2 + 3) << 20) + 100;
    std::fs::OpenOptions::new().write(true).open(&vol.image).unwrap().set_len(eof).unwrap();
    let r = scenario(&["short-read", &uri, "5", &eof.to_string()]);
    assert!(d.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let failed = log_events(&text, "request failed");
    assert_eq!(failed.len(), 2, "{text}");
    assert!(failed.iter().all(|e| e["errno"] == 5), "{text}");
    record("faults-short-read", &r);
}
