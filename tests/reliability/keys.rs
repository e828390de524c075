//! Key hygiene (issue 8, item 3).
//!
//! - After genkey, format, inspect, serve (with writes through NBD), shutdown, keyslot add,
//!   rewrap and header backup, neither the volume key nor any of the three KEKs appears in
//!   the raw volume, the header backup, or any output or log of those commands at trace
//!   level (`inspect --dump-volume-key`, whose job is to print the key, is left out). The volume key is recovered independently by
//!   `tests/py/unwrap_local.py` (Python `cryptography`) and proven right by decrypting a known
//!   sector, so a search that finds nothing means something. Every 16-byte window of each
//!   secret is searched for in binary, and every 32-digit window of its hex form in text.
//! - Core dumps: the running daemon's RLIMIT_CORE is 0/0, and a SIGABRT leaves no core where
//!   an unhardened process in the same directory leaves one.
//! - Not dumpable: run as an unprivileged uid, the daemon's /proc files belong to root and a
//!   process of the same uid can neither ptrace it nor read its /proc/PID/environ, while it
//!   can do both to an ordinary process of that uid (the control).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, pseudo_random};
use crate::harness::*;

fn run_logged(args: &[&str], logs: &mut Vec<(String, Vec<u8>)>) -> Output {
    let out = Command::new(bin()).args(["--log-level", "trace", "--log-format", "json"]).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    logs.push((format!("{} stdout", args[0]), out.stdout.clone()));
    logs.push((format!("{} stderr", args[0]), out.stderr.clone()));
    out
}

/// Every 16-byte window of each secret.
fn windows16(secrets: &[&[u8]]) -> HashSet<[u8; 16]> {
    secrets.iter().flat_map(|s| s.windows(16)).map(|w| w.try_into().unwrap()).collect()
}

fn find_binary(hay: &[u8], needles: &HashSet<[u8; 16]>) -> Option<usize> {
    hay.windows(16).position(|w| needles.contains(<&[u8; 16]>::try_from(w).unwrap()))
}

/// Every 32-digit window of each secret's hex, and the base64 of each whole secret.
fn find_text(hay: &[u8], secrets: &[&[u8]]) -> Option<String> {
    let text = String::from_utf8_lossy(hay).to_lowercase();
    for s in secrets {
        let h = hex::encode(s);
        for i in 0..=h.len() - 32 {
            if text.contains(&h[i..i + 32]) {
                return Some(format!("hex window {i}"));
            }
        }
    }
    let raw = String::from_utf8_lossy(hay);
    for s in secrets {
        let b64 = base64(s);
        if raw.contains(&b64[..40.min(b64.len())]) {
            return Some("base64".into());
        }
    }
    None
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

const WRITE_SCRIPT: &str = r#"
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
h.pwrite(random.Random(3).randbytes(size), 0)
h.pwrite(open(sys.argv[2], "rb").read(), int(sys.argv[3]))
h.flush()
h.shutdown()
"#;

#[test]
fn neither_key_appears_in_the_volume_or_the_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let mut logs = Vec::new();
    run_logged(&["genkey", &p("vol.kek")], &mut logs);
    std::fs::File::create(p("vol.img")).unwrap().set_len(16 << 20).unwrap();
    run_logged(&["format", &p("vol.img"), "--key", &format!("local:{}", p("vol.kek"))], &mut logs);
    run_logged(&["inspect", &p("vol.img")], &mut logs);
    run_logged(&["inspect", &p("vol.img"), "--json"], &mut logs);
    let sock = dir.path().join("nbd.sock");
    let d = DaemonProc::start(
        Path::new(&p("vol.img")),
        Path::new(&p("vol.kek")),
        &sock,
        Path::new(&p("serve.log")),
        "trace",
        &[],
    );
    let (index, ss) = (3u64, 4096usize);
    std::fs::write(p("known.bin"), pseudo_random(ss, 99)).unwrap();
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let out = Command::new(PYTHON)
        .args(["-c", WRITE_SCRIPT, &uri, &p("known.bin"), &(index * ss as u64).to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.stop().success());
    let serve_log = std::fs::read(p("serve.log")).unwrap();
    // (The daemon has no trace events of its own; debug ones show the filter let them through.)
    assert!(String::from_utf8_lossy(&serve_log).contains("\"DEBUG\""), "no debug events were logged");
    logs.push(("serve log".into(), serve_log));

    // Key management: a second slot under a second KEK, slot 0 rewrapped to a third KEK, a
    // header backup.
    let kek1 = format!("--kek-file={}", p("vol.kek"));
    run_logged(&["genkey", &p("two.kek")], &mut logs);
    run_logged(&["genkey", &p("three.kek")], &mut logs);
    run_logged(&["keyslot", "add", &p("vol.img"), "--key", &format!("local:{}", p("two.kek")), &kek1], &mut logs);
    run_logged(
        &["rewrap", &p("vol.img"), "--slot", "0", "--to", &format!("local:{}", p("three.kek")), &kek1],
        &mut logs,
    );
    run_logged(&["header", "backup", &p("vol.img"), &p("vol.header")], &mut logs);
    run_logged(&["keyslot", "list", &p("vol.img")], &mut logs);
    run_logged(&["inspect", &p("vol.img"), "--json"], &mut logs);

    // The volume key, unwrapped independently through each new KEK (the same key, which
    // decrypts the known sector).
    let unwrap = |kek: &str| -> (Vec<u8>, Vec<u8>) {
        let out = Command::new(PYTHON)
            .arg(script("unwrap_local.py"))
            .args([&p("vol.img"), &p(kek), &index.to_string(), &p("known.bin")])
            .output()
            .unwrap();
        assert!(out.status.success(), "unwrap_local.py {kek}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (hex::decode(v["key"].as_str().unwrap()).unwrap(), hex::decode(v["kek"].as_str().unwrap()).unwrap())
    };
    let (key, kek2) = unwrap("two.kek");
    let (key3, kek3) = unwrap("three.kek");
    assert!(key == key3, "the rewrapped slot holds another key");
    let kek = std::fs::read(p("vol.kek")).unwrap();
    let secrets: [&[u8]; 4] = [&key, &kek, &kek2, &kek3];
    let needles = windows16(&secrets);
    // The search itself finds what it should (a piece of the key, in binary and in hex).
    assert!(find_binary(&[b"x".as_slice(), &key[7..30]].concat(), &needles).is_some());
    assert!(find_text(format!("k={}", hex::encode_upper(&kek[3..20])).as_bytes(), &secrets).is_some());

    let image = std::fs::read(p("vol.img")).unwrap();
    assert_eq!(find_binary(&image, &needles), None, "key material in the raw volume");
    let backup = std::fs::read(p("vol.header")).unwrap();
    assert_eq!(find_binary(&backup, &needles), None, "key material in the header backup");
    let mut searched = image.len() + backup.len();
    for (name, bytes) in &logs {
        assert_eq!(find_binary(bytes, &needles), None, "key material (binary) in {name}");
        assert_eq!(find_text(bytes, &secrets), None, "key material (text) in {name}");
        searched += bytes.len();
    }
    record(
        "keys-hygiene",
        &serde_json::json!({
            "bytes_searched": searched, "log_sources": logs.len(),
            "windows_per_secret": [key.len() - 15, kek.len() - 15], "keks": 3, "found": 0,
        }),
    );
}

fn proc_field(pid: u32, file: &str, prefix: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} not in {file}")).to_string()
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (if still running) when the test ends, even by a panic.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cores_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core"))
        .collect()
}

#[test]
fn the_daemon_cannot_dump_core() {
    let vol = crate::common::Volume::new(8 << 20, 4096);
    let cwd = vol.path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let sock = vol.path("nbd.sock");
    let child = Command::new(bin())
        .args(["serve", vol.image.to_str().unwrap(), "--export", "t", "--socket", sock.to_str().unwrap()])
        .args(["--kek-file", vol.kek.to_str().unwrap(), "--log-format", "json"])
        .current_dir(&cwd)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(vol.path("d.log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(vol.path("d.log")).unwrap().contains("\"ready\"") {
        assert!(Instant::now() < deadline && child.0.try_wait().unwrap().is_none(), "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.0.id();
    let limit = proc_field(pid, "limits", "Max core file size");
    let fields: Vec<&str> = limit.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{limit}");
    // SIGABRT: its default action dumps core. (Not SIGSEGV: Rust's stack-overflow handler
    // catches a SIGSEGV sent by kill, restores the default action and returns, so the
    // process survives the first one.)
    assert!(Command::new("kill").args(["-ABRT", &pid.to_string()]).status().unwrap().success());
    let st = wait_exit(&mut child.0);
    assert_eq!(st.signal(), Some(libc::SIGABRT));
    assert!(!st.core_dumped(), "the kernel reports a core dump");
    assert!(cores_in(&cwd).is_empty(), "core files: {:?}", cores_in(&cwd));

    // The control: an ordinary process allowed to dump core, in the same directory.
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let mut ctl =
        Command::new("bash").args(["-c", "ulimit -c unlimited; exec sleep 60"]).current_dir(&cwd).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(Command::new("kill").args(["-ABRT", &ctl.id().to_string()]).status().unwrap().success());
    let st = wait_exit(&mut ctl);
    let control_dumped = st.core_dumped();
    for c in cores_in(&cwd) {
        let _ = std::fs::remove_file(cwd.join(c));
    }
    if !pattern.starts_with('|') {
        assert!(control_dumped, "the control did not dump core either: the check above proves nothing");
    }
    record(
        "keys-core-dump",
        &serde_json::json!({"rlimit_core": "0 0", "daemon_dumped": false, "control_dumped": control_dumped,
                            "core_pattern": pattern.trim()}),
    );
}

/// Runs `args` as uid/gid 65534 (nobody).
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).args(args);
    c
}

/// Whether uid 65534 can PTRACE_SEIZE `pid` (and read /proc/PID/environ).
fn nobody_can_trace(pid: u32) -> (bool, bool) {
    let seize = format!(
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); \
         r = libc.ptrace(0x4206, {pid}, None, None); print(r, ctypes.get_errno())"
    );
    let out = as_nobody(&[PYTHON, "-c", &seize]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let traced = text.trim().starts_with("0 ");
    let environ = as_nobody(&["cat", &format!("/proc/{pid}/environ")]).output().unwrap().status.success();
    (traced, environ)
}

#[test]
fn the_daemon_is_not_dumpable_by_its_own_uid() {
    use std::os::unix::fs::PermissionsExt;
    let vol = crate::common::Volume::new(8 << 20, 4096);
    let dir = vol.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in [&vol.image, &vol.kek] {
        std::os::unix::fs::chown(f, Some(65534), Some(65534)).unwrap();
    }
    let run = vol.path("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let wrap = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let d = DaemonProc::start(&vol.image, &vol.kek, &run.join("nbd.sock"), &vol.path("d.log"), "info", &wrap);
    let pid = d.pid();
    let uid = proc_field(pid, "status", "Uid:");
    assert_eq!(uid.split_whitespace().nth(1), Some("65534"), "{uid}");

    let control = Reaped(as_nobody(&["sleep", "60"]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let cpid = control.0.id();
    let owner = |pid: u32| std::fs::metadata(format!("/proc/{pid}/environ")).unwrap().uid();
    let (daemon_owner, control_owner) = (owner(pid), owner(cpid));
    let (daemon_traced, daemon_environ) = nobody_can_trace(pid);
    let (control_traced, control_environ) = nobody_can_trace(cpid);
    drop(control);
    assert_eq!(control_owner, 65534, "control: /proc files of a dumpable process belong to its uid");
    assert!(control_traced && control_environ, "control: the same uid can trace an ordinary process");
    assert_eq!(daemon_owner, 0, "the daemon's /proc files must belong to root (PR_SET_DUMPABLE=0)");
    assert!(!daemon_traced, "uid 65534 could ptrace the daemon");
    assert!(!daemon_environ, "uid 65534 could read the daemon's /proc/PID/environ");
    assert!(d.stop().success());
    record(
        "keys-not-dumpable",
        &serde_json::json!({"proc_owner": daemon_owner, "same_uid_ptrace": daemon_traced,
                            "same_uid_environ": daemon_environ, "control_ptrace": control_traced}),
    );
}
