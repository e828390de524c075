//! Soak (issue 8, item 4): mixed I/O from four clients that disconnect (cleanly or not) and
//! reconnect every few seconds, against the real daemon, for 60 s (`tests/run.sh`) or 600 s
//! (`NBDCRYPT_LONG=1`). `tests/py/soak.py` samples the daemon's /proc every second and fails
//! on RSS growth beyond 24 MiB after the warm-up, on file descriptors or threads not back to
//! their baseline once every client has left, on any request error, and on any byte that
//! does not read back as last written.

use std::time::Duration;

use crate::common::Volume;
use crate::harness::*;

fn soak(sector: u32) {
    let seconds = knob("NBDCRYPT_SOAK_SECONDS", 60, 600);
    let vol = Volume::new(66 << 20, sector);
    let sock = vol.path("nbd.sock");
    let d = DaemonProc::start(&vol.image, &vol.kek, &sock, &vol.path("d.log"), "info", &[]);
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
    let mut peer = Peer::spawn("soak.py", &args, vol.dir.path());
    let Some(line) = peer.try_recv(Duration::from_secs(seconds + 120)) else {
        let daemon = thread_stacks(d.pid());
        peer.dump_stacks();
        panic!("soak.py hung; its stderr:\n{}\ndaemon threads:\n{daemon}", peer.stderr_text());
    };
    let mut summary: serde_json::Value = serde_json::from_str(line.strip_prefix("SUMMARY ").unwrap()).unwrap();
    let samples = peer.recv(Duration::from_secs(10));
    peer.finish();
    assert!(d.stop().success());
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
