//! Soak (issue 8, item 4): mixed I/O from four clients that disconnect (cleanly or not) and
//! reconnect every few seconds, against the real daemon, for 60 s (`tests/run.sh`) or 600 s
//! (`NBDCRYPT_LONG=1`). `tests/py/soak.py` samples the daemon's /proc every second and fails
//! on anonymous RSS growth beyond 24 MiB after the warm-up (VmRSS also counts the touched
//! pages of the volume mapping, page cache), on file descriptors or threads not back to
//! their baseline once every client has left, on any request error, and on any byte that
//! does not read back as last written.
//!
//! The volume file lives on a tmpfs: the soak measures the daemon, not the machine's disk
//! (on a busy shared disk, fdatasync and even page faults of the daemon's own code take
//! seconds, which only slows the run down).

use std::time::Duration;

use crate::common::{check, nbdcrypt};
use crate::harness::*;

fn soak(sector: u32) {
    let seconds = knob("NBDCRYPT_SOAK_SECONDS", 60, 600);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "96m");
    let (image, kek) = (fs.0.join("vol.img"), dir.path().join("vol.kek"));
    check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
    std::fs::File::create(&image).unwrap().set_len(66 << 20).unwrap();
    let key = format!("local:{}", kek.display());
    let ss = sector.to_string();
    check(nbdcrypt(&["format", image.to_str().unwrap(), "--key", &key, "--sector-size", &ss]), "format");
    let sock = dir.path().join("nbd.sock");
    let d = DaemonProc::start(&image, &kek, &sock, &dir.path().join("d.log"), "info", &[]);
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let args: Vec<String> = [
        "--uri",
        &uri,
        "--pid",
        &d.pid().to_string(),
        "--seconds",
        &seconds.to_string(),
        "--sector",
        &sector.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut peer = Peer::spawn("soak.py", &args, dir.path());
    let Some(line) = peer.try_recv(Duration::from_secs(seconds + 300)) else {
        let daemon = thread_stacks(d.pid());
        peer.dump_stacks();
        let log = d.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "soak.py hung; its stderr:\n{}\ndaemon threads:\n{daemon}\ndaemon log (last lines, newest first):\n{}",
            peer.stderr_text(),
            tail.join("\n")
        );
    };
    let mut summary: serde_json::Value = serde_json::from_str(line.strip_prefix("SUMMARY ").unwrap()).unwrap();
    let samples = peer.recv(Duration::from_secs(10));
    peer.finish();
    assert!(d.stop().success());
    drop(fs);
    summary["sector_size"] = sector.into();
    record(&format!("soak-{sector}"), &summary);
    if let Some(dir) = std::env::var_os("NBDCRYPT_RESULTS_DIR") {
        std::fs::write(
            std::path::Path::new(&dir).join(format!("soak-{sector}-samples.json")),
            samples.strip_prefix("SAMPLES ").unwrap(),
        )
        .unwrap();
    }
    assert_eq!(summary["request_errors"], 0);
}

#[test]
fn soak_with_reconnecting_clients_keeps_memory_fds_and_threads_flat() {
    soak(4096);
}
