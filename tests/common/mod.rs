//! Shared harness for integration tests: a temp dir with a KEK and a formatted volume, the
//! real `nbdcrypt` binary serving it, and helpers to run real NBD clients against it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod raw;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nbdcrypt")
}

/// Runs nbdcrypt with `args`, returning its output.
pub fn nbdcrypt(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("NBDCRYPT_LOG", "info").output().expect("run nbdcrypt")
}

/// Panics with the tool's output unless it succeeded.
pub fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs an external client; fails the test clearly if the tool is missing.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}); install the test dependencies with tests/run.sh"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A formatted volume in a temp dir.
pub struct Volume {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub kek: PathBuf,
}

impl Volume {
    pub fn new(size: u64, sector_size: u32) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vol.img");
        let kek = dir.path().join("vol.kek");
        check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let ss = sector_size.to_string();
        check(
            nbdcrypt(&[
                "format",
                image.to_str().unwrap(),
                "--key",
                &format!("local:{}", kek.display()),
                "--sector-size",
                &ss,
            ]),
            "format",
        );
        Volume { dir, image, kek }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running daemon; killed (SIGKILL) on drop unless stopped.
pub struct Daemon {
    pub child: Child,
    pub uri: String,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    /// Serves `vol` as export `t` on a free TCP port.
    pub fn start(vol: &Volume, extra: &[&str]) -> Daemon {
        Self::try_start(vol, extra).unwrap_or_else(|log| panic!("daemon did not start:\n{log}"))
    }

    pub fn try_start(vol: &Volume, extra: &[&str]) -> Result<Daemon, String> {
        Self::try_start_wrapped(&[], vol, extra)
    }

    /// [`Daemon::try_start`] under a wrapper command (`prlimit ... setpriv ...`), which is given
    /// the binary and its arguments and must exec it (so the child's pid is the daemon's).
    pub fn try_start_wrapped(wrapper: &[&str], vol: &Volume, extra: &[&str]) -> Result<Daemon, String> {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", vol.image.to_str().unwrap(), "--export", "t", "--listen", &listen];
        let kek = vol.kek.to_str().unwrap().to_owned();
        args.extend(["--kek-file", &kek]);
        args.extend_from_slice(extra);
        // A control socket of its own: tests run in parallel, the default path is shared.
        let ctl = vol.dir.path().join(format!("ctl-{port}.sock")).to_str().unwrap().to_owned();
        if !extra.contains(&"--control-socket") {
            args.extend(["--control-socket", &ctl]);
        }
        let uri = format!("nbd://127.0.0.1:{port}/t");
        let cmd = match wrapper.split_first() {
            None => Command::new(bin()),
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin());
                cmd
            }
        };
        Self::launch(cmd, &args, vol.dir.path(), uri, port)
    }

    pub fn spawn(args: &[&str], dir: &Path, uri: String, port: u16) -> Result<Daemon, String> {
        Self::spawn_with(args, dir, uri, port, |_| {})
    }

    /// [`Daemon::spawn`], letting the caller adjust the command first (e.g. its environment).
    pub fn spawn_with(
        args: &[&str],
        dir: &Path,
        uri: String,
        port: u16,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Daemon, String> {
        let mut cmd = Command::new(bin());
        configure(&mut cmd);
        Self::launch(cmd, args, dir, uri, port)
    }

    /// Starts `cmd` (the daemon, or a wrapper that execs it) with `args`, and waits until the
    /// daemon logs that it is ready.
    fn launch(mut cmd: Command, args: &[&str], dir: &Path, uri: String, port: u16) -> Result<Daemon, String> {
        let log = dir.join(format!("daemon-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let child = cmd
            .args(args)
            .args(["--log-format", "json", "--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn daemon");
        let mut d = Daemon { child, uri, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = d.child.try_wait() {
                return Err(d.log_text());
            }
            if d.log_text().contains("\"ready\"") {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("timeout\n{}", d.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        unsafe_kill(self.child.id() as i32, sig);
    }

    /// Waits until the log contains `needle` (20 s at most).
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(mut self) -> i32 {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    // Sending a signal to our own child; the std API only offers SIGKILL.
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

pub mod kms;
