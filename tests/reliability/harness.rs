//! Helpers of the reliability tests: the long-run switch, a Python peer speaking a line
//! protocol on its stdin/stdout, the real daemon on a Unix socket, the server run in-process
//! on an export of the test's making, and where figures are recorded.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nbdcrypt::export::Export;
use nbdcrypt::nbd::handshake::Catalog;
use nbdcrypt::server::{self, ListenAddr, Listener, ServerOptions};
use tokio::sync::watch;

pub const PYTHON: &str = "/usr/bin/python3";

/// Whether the long versions run (`NBDCRYPT_LONG=1`, as `tests/long.sh` sets).
pub fn long() -> bool {
    std::env::var("NBDCRYPT_LONG").is_ok_and(|v| v == "1")
}

/// `name` from the environment, else `short` (or `long` in a long run).
pub fn knob(name: &str, short: u64, long_value: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(if long() { long_value } else { short })
}

pub fn script(name: &str) -> String {
    format!("{}/tests/py/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Prints a test's figures and, when `NBDCRYPT_RESULTS_DIR` is set, saves them as
/// `<dir>/<name>.json` (what `tests/long.sh` turns into the README table).
pub fn record(name: &str, value: &serde_json::Value) {
    eprintln!("[{name}] {value}");
    if let Some(dir) = std::env::var_os("NBDCRYPT_RESULTS_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        let path = Path::new(&dir).join(format!("{name}.json"));
        std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    }
}

/// A Python helper driven over its stdin/stdout, one line per message; its stderr goes to a
/// file shown when something fails.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Peer {
    pub fn spawn(script_name: &str, args: &[String], dir: &Path) -> Peer {
        let stderr = dir.join(format!("{script_name}.stderr"));
        let mut child = Command::new(PYTHON)
            .arg(script(script_name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {PYTHON} ({e}); install the test dependencies with tests/run.sh"));
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer { child, stdin, lines, stderr }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next line; panics with the peer's stderr if it exits or stays silent too long.
    pub fn recv(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(e) => {
                std::thread::sleep(Duration::from_millis(200));
                let status = self.child.try_wait().ok().flatten();
                panic!("python peer: {e} (exit {status:?}); stderr:\n{}", self.stderr_text())
            }
        }
    }

    /// The next line, or `None` after `timeout` (the peer is left running).
    pub fn try_recv(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Asks the peer for its Python stacks (scripts register faulthandler on SIGUSR1).
    pub fn dump_stacks(&self) {
        let _ = Command::new("kill").arg("-USR1").arg(self.child.id().to_string()).status();
        std::thread::sleep(Duration::from_secs(1));
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").and_then(|_| self.stdin.flush()).unwrap();
    }

    /// Waits for the peer to exit; panics with its stderr unless it succeeded.
    pub fn finish(mut self) {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "python peer failed ({st}):\n{}", self.stderr_text());
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real daemon serving one volume as export `t` on a Unix socket.
pub struct DaemonProc {
    pub child: Child,
    pub log: PathBuf,
}

impl DaemonProc {
    /// `serve IMAGE --export t --socket SOCK --kek-file KEK`, logging JSON at `level` to `log`;
    /// returns once the daemon logged "ready". `wrap` runs it under a wrapper command (such
    /// as `bash -c '...; exec "$@"'`), if given.
    pub fn start(image: &Path, kek: &Path, sock: &Path, log: &Path, level: &str, wrap: &[&str]) -> DaemonProc {
        let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
        args.push(crate::common::bin().to_string());
        for a in ["serve", &image.display().to_string(), "--export", "t"] {
            args.push(a.to_string());
        }
        args.extend(["--socket".into(), sock.display().to_string(), "--kek-file".into(), kek.display().to_string()]);
        args.extend(["--log-format".into(), "json".into(), "--log-level".into(), level.into()]);
        let child = Command::new(&args[0])
            .args(&args[1..])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn daemon");
        let mut d = DaemonProc { child, log: log.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("daemon exited ({st}) before it was ready:\n{}", d.log_text());
            }
            if d.log_text().contains("\"ready\"") {
                return d;
            }
            assert!(Instant::now() < deadline, "daemon not ready:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(st.success());
    }

    /// SIGTERM; waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `server::run` in this process, on a Unix socket, serving one export as `t`.
pub struct InProcess {
    pub rt: tokio::runtime::Runtime,
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl InProcess {
    pub fn new() -> InProcess {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        InProcess { rt, running: None }
    }

    pub fn start(&mut self, export: Arc<Export>, sock: &Path) {
        assert!(self.running.is_none());
        let addr = ListenAddr::Unix {
            path: sock.to_owned(),
            perms: nbdcrypt::server::SocketPerms { mode: 0o600, owner: None, group: None },
        };
        let listener = self.rt.block_on(Listener::bind(&addr)).unwrap();
        let exports = HashMap::from([("t".to_string(), export)]);
        let catalog = Catalog { exports: Arc::new(exports), default_export: Some("t".into()) };
        let (tx, rx) = watch::channel(false);
        let task = self.rt.spawn(server::run(vec![listener], catalog, ServerOptions::default(), rx));
        self.running = Some((tx, task));
    }

    /// Stops accepting, drains the connections, and waits for the server to finish.
    pub fn stop(&mut self) {
        if let Some((tx, task)) = self.running.take() {
            let _ = tx.send(true);
            self.rt.block_on(task).unwrap();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every thread's stack of a running process, for a hang report: gdb if it is installed,
/// else the kernel stacks and wait channels from /proc.
pub fn thread_stacks(pid: u32) -> String {
    let gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 30"])
        .stdin(Stdio::null())
        .output();
    if let Ok(out) = gdb {
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    let mut s = String::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        s += &format!("task {:?} {} wchan={}\n{}\n", t.file_name(), read("comm").trim(), read("wchan"), read("stack"));
    }
    s
}

/// The process's open file descriptors, threads and resident memory, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub fds: usize,
    pub tasks: usize,
    pub rss_kib: u64,
}

pub fn proc_sample(pid: u32) -> ProcSample {
    let count = |d: &str| std::fs::read_dir(format!("/proc/{pid}/{d}")).map(|r| r.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    ProcSample { fds: count("fd"), tasks: count("task"), rss_kib }
}

/// Deterministic pseudo-random numbers (splitmix64) for choices the tests make.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Sums the numeric fields of JSON objects (the per-round figures of the Python peers).
pub fn add_json(total: &mut serde_json::Map<String, serde_json::Value>, v: &serde_json::Value) {
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            if let Some(n) = x.as_u64() {
                let cur = total.get(k).and_then(|c| c.as_u64()).unwrap_or(0);
                total.insert(k.clone(), (cur + n).into());
            }
        }
    }
}
