//! Operations, against the real daemon: the metrics endpoint (scraped and parsed by the
//! reference Prometheus parser), suspend/resume over the control socket with a real client's
//! I/O held and released, sd_notify, SIGHUP reload, check-config, completions and man page,
//! the systemd units (`systemd-analyze verify`) and their system-call filter (against a strace
//! of the daemon), the attach script, and a log sink that stops taking lines.
//!
//! Needs `/usr/bin/python3` with `nbd` (python3-libnbd) and `prometheus_client`
//! (python3-prometheus-client), `systemd-analyze` (systemd), `strace` and `nbd-client`:
//! tests/run.sh installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::*;

const PY: &str = "/usr/bin/python3";

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// One sample: its labels and value.
type Sample = (HashMap<String, String>, f64);

/// A scrape parsed by prometheus_client: sample name → its samples.
struct Scrape {
    seconds: f64,
    content_type: String,
    samples: HashMap<String, Vec<Sample>>,
}

impl Scrape {
    fn get(url: &str) -> Scrape {
        let out = check(run(PY, &[repo("tests/py/scrape.py").to_str().unwrap(), url]), "scrape.py");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut samples: HashMap<String, Vec<_>> = HashMap::new();
        for s in v["samples"].as_array().unwrap() {
            let labels = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            samples
                .entry(s["name"].as_str().unwrap().to_owned())
                .or_default()
                .push((labels, s["value"].as_f64().unwrap()));
        }
        Scrape {
            seconds: v["scrape_seconds"].as_f64().unwrap(),
            content_type: v["content_type"].as_str().unwrap_or_default().to_owned(),
            samples,
        }
    }

    /// The value of the sample `name` whose labels include every pair of `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let all = self.samples.get(name).unwrap_or_else(|| panic!("no sample {name}"));
        let hit: Vec<f64> = all
            .iter()
            .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(hit.len(), 1, "{name} {want:?}: {all:?}");
        hit[0]
    }
}

/// Runs a libnbd Python snippet with `h` connected to `uri`; `sys.argv[2:]` are `args`.
fn nbd_py(uri: &str, body: &str, args: &[&str]) -> std::process::Output {
    let script = format!("import nbd, sys, hashlib\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{body}\n");
    let mut a = vec!["-c", &script, uri];
    a.extend_from_slice(args);
    run(PY, &a)
}

fn status_json(ctl: &Path) -> serde_json::Value {
    let out = check(nbdcrypt(&["status", "--control-socket", ctl.to_str().unwrap(), "--json"]), "status");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn metrics_scrape_parses_and_counts_requests_by_command_and_errno() {
    let vol = Volume::new(8 << 20, 4096);
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let d = Daemon::start(&vol, &["--metrics-listen", &maddr]);
    let io = "h.pwrite(b'\\x5a' * 65536, 0)\n\
              assert h.pread(65536, 0) == b'\\x5a' * 65536\n\
              h.flush()\n\
              h.set_strict_mode(0)\n\
              try:\n    h.pread(4096, 64 << 20)\n    raise SystemExit('out-of-range read succeeded')\n\
              except nbd.Error as e:\n    print(e.errno)\n\
              h.shutdown()";
    check(nbd_py(&d.uri, io, &[]), "libnbd workload");

    let s = Scrape::get(&format!("http://{maddr}/metrics"));
    assert!(s.content_type.starts_with("text/plain; version=0.0.4"), "{}", s.content_type);
    let e = ("export", "t");
    assert_eq!(s.value("nbdcrypt_requests_total", &[e, ("command", "write")]), 1.0);
    assert_eq!(s.value("nbdcrypt_requests_total", &[e, ("command", "read")]), 2.0);
    assert_eq!(s.value("nbdcrypt_requests_total", &[e, ("command", "flush")]), 1.0);
    assert_eq!(s.value("nbdcrypt_request_bytes_total", &[e, ("command", "write")]), 65536.0);
    // The failed read's bytes are not counted.
    assert_eq!(s.value("nbdcrypt_request_bytes_total", &[e, ("command", "read")]), 65536.0);
    assert_eq!(s.value("nbdcrypt_request_errors_total", &[e, ("errno", "EINVAL")]), 1.0);
    assert_eq!(s.value("nbdcrypt_request_errors_total", &[e, ("errno", "EIO")]), 0.0);
    assert_eq!(s.value("nbdcrypt_request_duration_seconds_count", &[e, ("command", "read")]), 2.0);
    assert_eq!(s.value("nbdcrypt_request_duration_seconds_bucket", &[e, ("command", "read"), ("le", "+Inf")]), 2.0);
    assert_eq!(s.value("nbdcrypt_requests_in_flight", &[e]), 0.0);
    assert_eq!(s.value("nbdcrypt_connections_total", &[e]), 1.0);
    // Only its presence is checked (`value` panics on a missing sample): normally 0, but a
    // loaded test machine may hold a write up for 10 ms.
    let _ = s.value("nbdcrypt_slow_writes_total", &[e]);
    assert_eq!(s.value("nbdcrypt_suspended", &[e]), 0.0);
    let unlocked = s.value("nbdcrypt_unlocked_time_seconds", &[e]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(unlocked > now - 120.0 && unlocked <= now + 1.0, "unlocked at {unlocked}, now {now}");
    assert!(s.value("nbdcrypt_cipher_contexts", &[]) > 0.0);
    assert!(s.value("nbdcrypt_key_pages_locked", &[]) > 0.0);
    assert_eq!(s.value("nbdcrypt_key_allocations_unlocked", &[]), 0.0);
    assert_eq!(s.value("nbdcrypt_log_lines_dropped_total", &[]), 0.0);
    eprintln!("metrics scrape took {:.2} ms", s.seconds * 1e3);

    // Anything but /metrics is a 404.
    let out = run(PY, &["-c", "import urllib.request,sys\ntry:\n urllib.request.urlopen(sys.argv[1])\nexcept urllib.error.HTTPError as e:\n print(e.code)", &format!("http://{maddr}/")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "404");
    assert_eq!(d.stop(), 0);
}

/// The `key` field of every JSON log line whose message is one of `messages`.
fn log_fields(d: &Daemon, messages: &[&str], key: &str) -> Vec<u64> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| messages.iter().any(|m| v["message"] == *m))
        .map(|v| v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}")))
        .collect()
}

#[test]
fn a_flood_of_bad_connections_is_counted_in_full_and_logged_at_most_once_a_second() {
    const N: u64 = 60;
    let vol = Volume::new(8 << 20, 4096);
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    // A failed connection's slot is free just after the client sees it closed; 8 slots leave
    // room for a few of those still in flight.
    let d = Daemon::start(&vol, &["--metrics-listen", &maddr, "--max-connections", "8"]);
    let metrics = format!("http://{maddr}/metrics");
    // The server counts an event just after closing the socket: waits for the count.
    let scrape_when = |name: &str, labels: &[(&str, &str)]| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = Scrape::get(&metrics);
            if s.value(name, labels) == N as f64 || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let started = Instant::now();
    for _ in 0..N {
        let mut c = Raw::connect(d.port);
        c.greet(0); // not fixed newstyle: the handshake fails
        assert!(c.is_closed());
    }
    scrape_when("nbdcrypt_handshakes_failed_total", &[("reason", "error")]);
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<_> = (0..8).map(|_| Raw::connect(d.port).open("t", false).0).collect();
    for _ in 0..N {
        assert!(Raw::connect(d.port).is_closed(), "over the cap: closed at once");
    }
    let secs = started.elapsed().as_secs() + 1;
    let s = scrape_when("nbdcrypt_connections_refused_total", &[]);
    assert_eq!(s.value("nbdcrypt_handshakes_failed_total", &[("reason", "error")]), N as f64);
    assert_eq!(s.value("nbdcrypt_handshakes_failed_total", &[("reason", "timeout")]), 0.0);
    assert_eq!(s.value("nbdcrypt_connections_refused_total", &[]), N as f64);
    // Lines are written by the log thread, a little after the event.
    d.wait_for_log("handshake failed");
    d.wait_for_log("connection limit reached");
    for (messages, key) in [
        (&["handshake failed", "handshake timed out"][..], "failures"),
        (&["connection refused: connection limit reached"][..], "refused"),
    ] {
        let counts = log_fields(&d, messages, key);
        // A line per second at most, each standing for the events since the line before.
        assert!(
            !counts.is_empty() && counts.len() as u64 <= secs + 1,
            "{} {messages:?} lines in {secs} s",
            counts.len()
        );
        assert!((counts.len() as u64) < N, "throttled: {counts:?}");
        assert_eq!(counts[0], 1, "the first event is logged at once: {counts:?}");
        assert!(counts.iter().sum::<u64>() <= N, "{counts:?}");
    }
    held.into_iter().for_each(|c| c.disconnect());
    assert_eq!(d.stop(), 0);
}

/// A client that completes handshakes in a loop gets at most `CONNECTION_LOG_BURST` (16)
/// connections a second logged at info, the rest at debug; the next second's first logged
/// connection says how many were not, so the counts add up to every connection.
#[test]
fn a_flood_of_clients_is_logged_16_connections_a_second_and_counted_in_full() {
    const N: u64 = 100;
    let vol = Volume::new(8 << 20, 4096);
    let maddr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&vol, &["--metrics-listen", &maddr]);
    let started = Instant::now();
    for _ in 0..N {
        Raw::connect(d.port).open("t", false).0.disconnect();
    }
    let secs = started.elapsed().as_secs() + 1;
    // One more a second later: the first of its second, it reports the connections before.
    std::thread::sleep(Duration::from_millis(1100));
    Raw::connect(d.port).open("t", false).0.disconnect();
    let total = N + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = |message: &str, level: &str| -> Vec<serde_json::Value> {
        d.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message && v["level"] == level)
            .collect()
    };
    // Every connection's lines are written (by the log thread, a little after the event).
    while (lines("client disconnected", "INFO").len() + lines("client disconnected", "DEBUG").len()) < total as usize {
        assert!(Instant::now() < deadline, "not every disconnection logged:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = lines("client connected", "INFO").len() as u64;
    let debug = lines("client connected", "DEBUG").len() as u64;
    assert_eq!(info + debug, total);
    assert_eq!(lines("client disconnected", "INFO").len() as u64, info, "a connection's two lines share a level");
    assert!(info <= 16 * (secs + 1) + 1 && info < N, "{info} connections logged at info in {secs} s");
    let unlogged: u64 = log_fields(&d, &["client connections logged at debug only"], "connections").iter().sum();
    assert_eq!(info + unlogged, total, "{info} logged, {unlogged} reported as not");
    let s = Scrape::get(&format!("http://{maddr}/metrics"));
    assert_eq!(s.value("nbdcrypt_connections_total", &[("export", "t")]), total as f64);
    assert_eq!(d.stop(), 0);
}

#[test]
fn suspend_holds_io_until_resume_and_the_data_survives() {
    let vol = Volume::new(8 << 20, 4096);
    let ctl = vol.path("ctl.sock");
    let d = Daemon::start(&vol, &["--control-socket", ctl.to_str().unwrap()]);
    let data = pseudo_random(1 << 20, 7);
    std::fs::write(vol.path("data.bin"), &data).unwrap();
    check(
        nbd_py(
            &d.uri,
            "h.pwrite(open(sys.argv[2], 'rb').read(), 0)\nh.flush()\nh.shutdown()",
            &[vol.path("data.bin").to_str().unwrap()],
        ),
        "write",
    );
    let st = status_json(&ctl);
    assert!(st["cipher_contexts"].as_u64().unwrap() > 0);
    // The engine serving the volume is named (which one depends on the CPU), and logged.
    let engine = st["exports"][0]["cipher"].as_str().unwrap_or_default().to_string();
    assert!(["vaes-avx512", "aws-lc"].contains(&engine.as_str()), "{st}");
    assert!(d.log_text().contains(&format!(r#""cipher":"{engine}""#)), "{}", d.log_text());
    // Key memory (the key schedules) is mlocked, and the kernel agrees.
    assert_eq!(st["unlocked_key_allocations"], 0, "{st}");
    let pages = st["locked_key_pages"].as_u64().unwrap();
    assert!(pages > 0, "{st}");
    assert!(status_kib(st["pid"].as_u64().unwrap(), "VmLck") >= pages * page_kib(), "{st}");

    check(nbdcrypt(&["suspend", "--control-socket", ctl.to_str().unwrap()]), "suspend");
    let st = status_json(&ctl);
    assert_eq!(st["exports"][0]["state"], "suspended");
    // The cipher was dropped: no key schedule is left in the daemon, and no engine is named.
    assert_eq!(st["cipher_contexts"], 0, "{st}");
    assert!(st["exports"][0].get("cipher").is_none(), "{st}");
    assert_eq!(st["exports"][0]["counters"]["unlocked_at"], 0);
    // Nor any other key allocation: the secrets' and schedules' page locks are all released.
    assert_eq!((st["locked_key_pages"].as_u64(), st["unlocked_key_allocations"].as_u64()), (Some(0), Some(0)), "{st}");

    // A client's read now waits instead of failing.
    let script = "import nbd, sys, hashlib\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                  print(hashlib.sha256(h.pread(1 << 20, 0)).hexdigest())\nh.shutdown()";
    let reader =
        Command::new(PY).args(["-c", script, &d.uri]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut reader = reader;
    assert!(reader.try_wait().unwrap().is_none(), "the read completed while suspended");
    assert_eq!(status_json(&ctl)["exports"][0]["counters"]["in_flight"], 1);

    // The wrong key does not unlock it: exit 3, still suspended.
    let wrong = vol.path("wrong.kek");
    check(nbdcrypt(&["genkey", wrong.to_str().unwrap()]), "genkey");
    let out = nbdcrypt(&["resume", "--control-socket", ctl.to_str().unwrap(), "--kek-file", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status_json(&ctl)["exports"][0]["state"], "suspended");
    assert!(reader.try_wait().unwrap().is_none());

    // Resume (with the daemon's own configured KEK): the held read completes with the data.
    let out = check(nbdcrypt(&["resume", "--control-socket", ctl.to_str().unwrap()]), "resume");
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed (slot 0)"));
    let out = reader.wait_with_output().unwrap();
    assert!(out.status.success(), "reader: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sha256_hex(&data));
    let st = status_json(&ctl);
    assert_eq!(st["exports"][0]["state"], "active");
    assert!(st["cipher_contexts"].as_u64().unwrap() > 0);
    let log = d.log_text();
    assert!(log.contains("volume suspended") && log.contains("volume unlocked: resumed"), "{log}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn key_memory_the_os_refuses_to_lock_is_reported_and_the_volume_still_serves() {
    // RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK (root would bypass the limit): every mlock fails.
    let vol = Volume::new(8 << 20, 4096);
    let ctl = vol.path("ctl.sock");
    let wrapper = ["prlimit", "--memlock=0:0", "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"];
    let d = Daemon::try_start_wrapped(&wrapper, &vol, &["--control-socket", ctl.to_str().unwrap()])
        .unwrap_or_else(|log| panic!("daemon did not start:\n{log}"));
    let io = "h.pwrite(b'\\x5a' * 65536, 0)\nassert h.pread(65536, 0) == b'\\x5a' * 65536\nh.shutdown()";
    check(nbd_py(&d.uri, io, &[]), "write and read back");

    let st = status_json(&ctl);
    assert_eq!(st["locked_key_pages"], 0, "{st}");
    // Every live key schedule is an allocation the OS refused to lock: on AWS-LC at least the
    // two templates and one copy per direction, on the wide engine its one set.
    assert!(st["unlocked_key_allocations"].as_u64().unwrap() >= st["cipher_contexts"].as_u64().unwrap(), "{st}");
    assert!(st["cipher_contexts"].as_u64().unwrap() >= 1, "{st}");
    let text = check(nbdcrypt(&["status", "--control-socket", ctl.to_str().unwrap()]), "status");
    assert!(String::from_utf8_lossy(&text.stdout).contains("could not be locked in memory"));
    assert!(d.log_text().contains("could not lock key memory"), "{}", d.log_text());
    assert_eq!(d.stop(), 0);
}

#[test]
fn shutdown_while_suspended_fails_held_requests_and_exits_cleanly() {
    let vol = Volume::new(8 << 20, 4096);
    let ctl = vol.path("ctl.sock");
    let d = Daemon::start(&vol, &["--control-socket", ctl.to_str().unwrap()]);
    check(nbdcrypt(&["suspend", "--control-socket", ctl.to_str().unwrap()]), "suspend");
    let script = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                  try:\n    h.pread(4096, 0)\n    print('ok')\nexcept nbd.Error as e:\n    print('error', e.errno)";
    let reader = Command::new(PY).args(["-c", script, &d.uri]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    assert_eq!(d.stop(), 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // ESHUTDOWN (108) if the reply arrived before the socket closed; else the connection died.
    assert!(text.starts_with("error"), "{text}");
}

#[test]
fn sd_notify_gets_ready_after_binding_and_stopping_at_shutdown() {
    let vol = Volume::new(8 << 20, 4096);
    let sock_path = vol.path("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(bin())
        .args(["serve", vol.image.to_str().unwrap(), "--export", "t", "--listen", &listen])
        .args(["--kek-file", vol.kek.to_str().unwrap(), "--control-socket", ""])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon { child, uri: format!("nbd://{listen}/t"), port, log: vol.path("none.log") };
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", d.child.id())), "{msg}");
    // READY means the listener is bound: a client connects at once.
    check(run("nbdinfo", &["--size", &d.uri]), "nbdinfo");
    d.signal(libc::SIGTERM);
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1"));
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
}

#[test]
fn sighup_reloads_log_level_and_metrics_and_names_what_needs_a_restart() {
    let vol = Volume::new(8 << 20, 4096);
    let (port, m1, m2) = (free_port(), free_port(), free_port());
    let write_config = |metrics: u16, max_conn: u32, level: &str| {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nmax_connections = {max_conn}\n\
             metrics_listen = \"127.0.0.1:{metrics}\"\ncontrol_socket = \"\"\n[log]\nlevel = \"{level}\"\n\
             [[export]]\nname = \"t\"\ndevice = \"vol.img\"\nkek_files = [\"vol.kek\"]\n"
        );
        std::fs::write(vol.path("nbdcrypt.toml"), text).unwrap();
    };
    write_config(m1, 64, "info");
    let cfg = vol.path("nbdcrypt.toml");
    // No --log-level: the config file's level is in force and reloadable.
    let log = vol.path("daemon.log");
    let child = Command::new(bin())
        .args(["serve", "--config", cfg.to_str().unwrap(), "--log-format", "json"])
        .env_remove("NBDCRYPT_LOG")
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, uri: format!("nbd://127.0.0.1:{port}/t"), port, log };
    d.wait_for_log("\"ready\"");
    Scrape::get(&format!("http://127.0.0.1:{m1}/metrics"));
    assert!(!d.log_text().contains("\"DEBUG\""));

    write_config(m2, 8, "debug");
    d.signal(libc::SIGHUP);
    d.wait_for_log("need a restart");
    let log = d.log_text();
    assert!(log.contains("server.max_connections"), "{log}");
    assert!(log.contains("log level applied"), "{log}");
    // The metrics endpoint moved.
    let s = Scrape::get(&format!("http://127.0.0.1:{m2}/metrics"));
    assert_eq!(s.value("nbdcrypt_suspended", &[("export", "t")]), 0.0);
    assert!(std::net::TcpStream::connect(("127.0.0.1", m1)).is_err(), "old metrics port still open");
    // Debug lines now appear: a failed request is logged at debug.
    let bad = "h.set_strict_mode(0)\ntry:\n    h.pread(4096, 1 << 40)\nexcept nbd.Error:\n    pass\nh.shutdown()";
    check(nbd_py(&d.uri, bad, &[]), "bad read");
    d.wait_for_log("\"DEBUG\"");

    // A config that does not parse changes nothing.
    std::fs::write(&cfg, "[server]\nbogus = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for_log("config not reloaded");
    Scrape::get(&format!("http://127.0.0.1:{m2}/metrics"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn check_config_accepts_a_good_file_and_prints_it_resolved() {
    let vol = Volume::new(8 << 20, 4096);
    let cfg = vol.path("c.toml");
    std::fs::write(&cfg, "[[export]]\nname = \"v\"\ndevice = \"vol.img\"\nkek_files = [\"vol.kek\"]\n").unwrap();
    let out = check(nbdcrypt(&["check-config", cfg.to_str().unwrap()]), "check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("device = \"{}\"", vol.image.display())), "{text}");
    assert!(text.contains("listen = [\"127.0.0.1:10809\"]"), "{text}");
    assert!(text.contains("max_connections = 64"), "{text}");
}

#[test]
fn check_config_refuses_an_unknown_key_and_a_missing_kek_file() {
    let vol = Volume::new(8 << 20, 4096);
    let cfg = vol.path("c.toml");
    std::fs::write(&cfg, "[server]\nlisten = []\nsocket = \"x.sock\"\nmetrics = 1\n").unwrap();
    let out = nbdcrypt(&["check-config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics") && err.contains("line 4"), "{err}");

    std::fs::write(&cfg, "[[export]]\nname = \"v\"\ndevice = \"vol.img\"\nkek_files = [\"gone.kek\"]\n").unwrap();
    let out = nbdcrypt(&["check-config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gone.kek"));
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let out = check(nbdcrypt(&["completions", "bash"]), "completions bash");
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("nbdcrypt.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    check(run("bash", &["-n", script.to_str().unwrap()]), "bash -n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    for shell in ["zsh", "fish"] {
        let out = check(nbdcrypt(&["completions", shell]), shell);
        assert!(String::from_utf8_lossy(&out.stdout).contains("suspend"));
    }
    let out = check(nbdcrypt(&["manpage"]), "manpage");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH nbdcrypt 1"), "{}", &page[..200.min(page.len())]);
    assert!(page.contains("Exit codes"));
    let dir = tempfile::tempdir().unwrap();
    check(nbdcrypt(&["manpage", "--dir", dir.path().to_str().unwrap()]), "manpage --dir");
    assert!(dir.path().join("nbdcrypt-resume.1").exists());
    // Every command's --help carries an example.
    for cmd in [
        "genkey",
        "format",
        "serve",
        "inspect",
        "benchmark",
        "status",
        "suspend",
        "resume",
        "check-config",
        "completions",
        "manpage",
    ] {
        let out = check(nbdcrypt(&[cmd, "--help"]), cmd);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Example"), "{cmd} --help has no example");
    }
}

/// Copies the units to a folder, pointing ExecStart at the built binary and the repo's attach
/// script (verify checks that the executables exist), with instance names for the templates.
fn staged_units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["nbdcrypt@.service", "nbdcrypt-attach@.service"] {
        let text = std::fs::read_to_string(repo("deploy").join(unit))
            .unwrap()
            .replace("/usr/bin/nbdcrypt", bin())
            .replace("/usr/lib/nbdcrypt/nbdcrypt-attach", repo("deploy/nbdcrypt-attach").to_str().unwrap());
        std::fs::write(dir.path().join(unit), text).unwrap();
        let instance = unit.replace("@.", "@vol1.");
        std::os::unix::fs::symlink(dir.path().join(unit), dir.path().join(instance)).unwrap();
    }
    dir
}

#[test]
fn systemd_analyze_verify_passes_on_the_units_without_a_warning() {
    let dir = staged_units();
    let units = [dir.path().join("nbdcrypt@vol1.service"), dir.path().join("nbdcrypt-attach@vol1.service")];
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (apt install systemd; tests/run.sh does)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    // verify exits 0 on unknown keys and bad values, only printing them: any output is a failure.
    let noise: Vec<&str> = text.lines().filter(|l| !l.contains("multi-user.target")).collect();
    assert!(noise.is_empty(), "systemd-analyze verify:\n{text}");
}

/// Runs the daemon (from a config with TCP, Unix, metrics and control sockets) behind
/// `launcher` (strace, run-confined), exercises every path: I/O of each kind over TCP and Unix,
/// a metrics scrape, status, suspend, resume, SIGHUP and SIGTERM; returns its log.
fn full_lifecycle(vol: &Volume, launcher: &[&str]) -> String {
    let (port, mport) = (free_port(), free_port());
    let ctl = vol.path("ctl.sock");
    let cfg = vol.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nsocket = \"nbd.sock\"\nmetrics_listen = \"127.0.0.1:{mport}\"\n\
             control_socket = \"ctl.sock\"\n[[export]]\nname = \"t\"\ndevice = \"vol.img\"\nkek_files = [\"vol.kek\"]\nallow_discards = true\n"
        ),
    )
    .unwrap();
    let log = vol.path("daemon.log");
    let child = Command::new(launcher[0])
        .args(&launcher[1..])
        .args([bin(), "serve", "--config", cfg.to_str().unwrap(), "--log-format", "json", "--log-level", "debug"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{} ({e}); tests/run.sh installs it", launcher[0]));
    let mut d = Daemon { child, uri: format!("nbd://127.0.0.1:{port}/t"), port, log };
    d.wait_for_log("\"ready\"");
    // A launcher that traces (strace) would leave the daemon running if killed: kill the
    // daemon itself if the test fails half-way.
    let pid = status_json(&ctl)["pid"].as_i64().unwrap();
    let _reaper = KillOnDrop(pid);
    let io = "h.set_strict_mode(0)\nh.pwrite(b'x' * 100000, 5)\nh.pread(70000, 3)\nh.trim(65536, 0)\n\
              h.zero(9000, 100)\nh.flush()\nh.cache(4096, 0)\nh.shutdown()";
    check(nbd_py(&d.uri, io, &[]), "tcp io");
    let unix_uri = format!("nbd+unix:///t?socket={}", vol.path("nbd.sock").display());
    check(nbd_py(&unix_uri, "h.pread(4096, 0)\nh.shutdown()", &[]), "unix io");
    Scrape::get(&format!("http://127.0.0.1:{mport}/metrics"));
    let ctl_s = ctl.to_str().unwrap();
    check(nbdcrypt(&["suspend", "--control-socket", ctl_s]), "suspend");
    check(nbdcrypt(&["resume", "--control-socket", ctl_s]), "resume");
    check(run("kill", &["-HUP", &pid.to_string()]), "SIGHUP");
    d.wait_for_log("configuration reloaded");
    check(run("kill", &["-TERM", &pid.to_string()]), "SIGTERM");
    d.wait_for_log("shutdown complete");
    let status = d.child.wait().unwrap();
    let log = d.log_text();
    assert!(status.success(), "{status}\n{log}");
    log
}

#[test]
fn the_daemon_makes_only_system_calls_the_unit_filter_allows() {
    let vol = Volume::new(8 << 20, 4096);
    let trace = vol.path("strace.txt");
    full_lifecycle(&vol, &["strace", "-f", "-qq", "-o", trace.to_str().unwrap()]);
    let unit = repo("deploy/nbdcrypt@.service");
    let out = run(repo("deploy/check-syscalls").to_str().unwrap(), &[unit.to_str().unwrap(), trace.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "the unit's SystemCallFilter would refuse:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_daemon_runs_under_the_units_seccomp_filter_and_memory_deny_write_execute() {
    // A real seccomp allow-list (EPERM for the rest), no_new_privs and the kernel's MDWE, as
    // the unit asks for them: every path still works and nothing logs EPERM.
    let vol = Volume::new(8 << 20, 4096);
    let confine = repo("deploy/run-confined");
    let unit = repo("deploy/nbdcrypt@.service");
    let log = full_lifecycle(&vol, &[confine.to_str().unwrap(), unit.to_str().unwrap(), "--"]);
    assert!(!log.contains("not permitted") && !log.contains("\"WARN\""), "{log}");
    assert!(log.contains("core dumps disabled"), "{log}");
}

/// Sends SIGKILL to a process on drop (a no-op if it is gone).
struct KillOnDrop(i64);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).stderr(Stdio::null()).status();
    }
}

#[test]
fn the_attach_script_runs_nbd_client_over_the_unix_socket_with_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vol1.attach"), "DEVICE=/dev/nbd3\nCONNECTIONS=2\nTIMEOUT=30\n").unwrap();
    let out = Command::new(repo("deploy/nbdcrypt-attach"))
        .args(["print", "vol1"])
        .env("NBDCRYPT_ATTACH_CONF_DIR", dir.path())
        .output()
        .unwrap();
    let cmd = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        cmd.trim(),
        "nbd-client -unix /run/nbdcrypt/vol1.sock /dev/nbd3 -name vol1 -connections 2 -block-size 4096 -timeout 30 \
         -systemd-mark -persist -nonetlink"
    );
}

#[test]
fn nbd_client_negotiates_with_the_daemon_over_its_unix_socket() {
    // No kernel nbd module here to attach a device; listing the exports runs nbd-client's
    // real handshake over the same socket the attach script uses.
    let vol = Volume::new(8 << 20, 4096);
    let sock = vol.path("nbd.sock");
    let d = Daemon::start(&vol, &["--socket", sock.to_str().unwrap()]);
    let out = check(run("nbd-client", &["-unix", sock.to_str().unwrap(), "-l"]), "nbd-client -l");
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "t"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn kms_calls_are_counted_and_resume_unwraps_through_kms_again() {
    let mut kms = common::kms::KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = common::kms::KmsVolume::format(&kms, 8 << 20, 4096, &format!("aws-kms:{key}"), &[]);
    let (port, mport) = (free_port(), free_port());
    let (listen, maddr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{mport}"));
    let ctl = vol.path("ctl.sock");
    let args = ["serve", vol.image(), "--export", "t", "--listen", &listen, "--metrics-listen", &maddr];
    let mut args = args.to_vec();
    args.extend(["--control-socket", ctl.to_str().unwrap()]);
    let d = Daemon::spawn_with(&args, vol.dir.path(), format!("nbd://{listen}/t"), port, |c| {
        kms.configure(c, Some(&kms.proxy_url()))
    })
    .unwrap();
    assert_eq!(kms.count("Decrypt"), 1);

    check(nbdcrypt(&["suspend", "--control-socket", ctl.to_str().unwrap()]), "suspend");
    // One refused Decrypt, then the resume that works: both are counted.
    kms.fault(serde_json::json!({"op": "Decrypt", "kind": "error", "code": "AccessDeniedException", "count": 1}));
    let out = nbdcrypt(&["resume", "--control-socket", ctl.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    check(nbdcrypt(&["resume", "--control-socket", ctl.to_str().unwrap()]), "resume");
    assert_eq!(kms.count("Decrypt"), 3);

    let s = Scrape::get(&format!("http://{maddr}/metrics"));
    assert_eq!(s.value("nbdcrypt_kms_requests_total", &[("op", "Decrypt"), ("result", "ok")]), 2.0);
    assert_eq!(s.value("nbdcrypt_kms_requests_total", &[("op", "Decrypt"), ("result", "error")]), 1.0);
    assert_eq!(s.value("nbdcrypt_kms_errors_total", &[("op", "Decrypt"), ("code", "access_denied")]), 1.0);
    assert_eq!(s.value("nbdcrypt_kms_request_duration_seconds_count", &[("op", "Decrypt")]), 3.0);
    assert_eq!(s.value("nbdcrypt_suspended", &[("export", "t")]), 0.0);
    assert_eq!(d.stop(), 0);
}

/// The page size in KiB (`VmLck` counts KiB, the daemon counts pages).
fn page_kib() -> u64 {
    let out = std::process::Command::new("getconf").arg("PAGESIZE").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse::<u64>().unwrap() / 1024
}

/// A memory figure of the daemon in KiB: `field` of /proc/PID/status (`VmLck`, `RssAnon`).
fn status_kib(pid: u64, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':'))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A log sink that stops taking lines does not stall the daemon: with stderr a pipe nobody
/// reads (full after 64 KiB), 3000 connections (at debug, two lines each or more: more than
/// the pipe and the daemon's queue of 4096 lines hold; at info, connections past 16 a second
/// are not logged) are all served, and the lines that did not fit are counted as dropped.
/// Logging synchronously, the daemon stopped answering after about 200.
#[test]
fn a_log_sink_that_stops_taking_lines_does_not_stall_connections() {
    let vol = Volume::new(4 << 20, 4096);
    let (port, mport) = (free_port(), free_port());
    let (listen, maddr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{mport}"));
    let ctl = vol.path("ctl.sock");
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Killed(
        Command::new(bin())
            .args(["serve", vol.image.to_str().unwrap(), "--export", "t", "--listen", &listen])
            .args(["--kek-file", vol.kek.to_str().unwrap(), "--control-socket", ctl.to_str().unwrap()])
            .args(["--metrics-listen", &maddr, "--log-format", "json", "--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The child's stderr pipe stays open (in `_daemon`) and is never read.
    let uri = format!("nbd://127.0.0.1:{port}/t");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run("nbdinfo", &["--size", &uri]).status.success() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = "import nbd, sys\n\
                  for i in range(int(sys.argv[2])):\n    \
                      h = nbd.NBD()\n    h.connect_uri(sys.argv[1])\n    h.shutdown()\n    del h\n\
                  print('done')";
    let out = run("timeout", &["30", PY, "-c", script, &uri, "3000"]);
    assert!(out.status.success(), "connections stalled behind the log sink:\n{}", String::from_utf8_lossy(&out.stderr));
    let s = Scrape::get(&format!("http://{maddr}/metrics"));
    assert!(s.value("nbdcrypt_log_lines_dropped_total", &[]) > 0.0, "the sink never filled: the test proves nothing");
}

/// Connections that go quiet after a burst of 1 MiB requests give their pooled buffers back
/// after `IDLE_RELEASE` (5 s), not at once (a busy client keeps reusing them) and not only
/// when they close; the same connections then serve the same data again.
#[test]
fn idle_connections_give_their_buffers_back_and_keep_serving() {
    use std::io::{BufRead, BufReader, Write};
    let vol = Volume::new(64 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let pid = u64::from(d.child.id());
    let at_rest = status_kib(pid, "RssAnon");
    // Four connections writing, then reading, 12 MiB each, all requests sent at once (12 in
    // flight per connection: its whole budget), the data checked; the reads again on each line
    // of stdin.
    let script = "import nbd, sys\n\
        hs = [nbd.NBD() for _ in range(4)]\n\
        for h in hs: h.connect_uri(sys.argv[1])\n\
        def burst(write):\n    \
            bufs = [[nbd.Buffer(1 << 20) for _ in range(12)] for _ in hs]\n    \
            for i, h in enumerate(hs):\n        \
                for j, b in enumerate(bufs[i]):\n            \
                    off = (i * 12 + j) << 20\n            \
                    if write: h.aio_pwrite(bytes([i * 12 + j + 1]) * (1 << 20), off)\n            \
                    else: h.aio_pread(b, off)\n    \
            for h in hs:\n        \
                while h.aio_in_flight() > 0: h.poll(-1)\n    \
            if not write:\n        \
                for i in range(len(hs)):\n            \
                    for j, b in enumerate(bufs[i]): assert b.to_bytearray() == bytes([i * 12 + j + 1]) * (1 << 20), (i, j)\n\
        burst(True)\n\
        burst(False)\n\
        print('burst', flush=True)\n\
        for _ in sys.stdin:\n    \
            burst(False)\n    \
            print('again', flush=True)\n";
    let mut py =
        Command::new(PY).args(["-c", script, &d.uri]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let mut stdin = py.stdin.take().unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "burst");
    let busy = status_kib(pid, "RssAnon");
    assert!(busy > at_rest + 4 * 4 * 1024, "the burst did not fill the pools ({at_rest} -> {busy} KiB)");
    std::thread::sleep(Duration::from_secs(2));
    let soon = status_kib(pid, "RssAnon");
    assert!(soon > at_rest + 4 * 4 * 1024, "buffers went before the connections were idle for long ({soon} KiB)");
    // Then at most the input buffers (4 x 256 KiB) and some slack above the daemon at rest.
    let deadline = Instant::now() + Duration::from_secs(10);
    let released = loop {
        let now = status_kib(pid, "RssAnon");
        if now < at_rest + 4 * 256 + 4096 {
            break now;
        }
        assert!(Instant::now() < deadline, "idle buffers were kept: {at_rest} at rest, {busy} busy, {now} KiB now");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(log_fields(&d, &["idle connection: buffers released"], "bytes").len(), 4, "{}", d.log_text());
    writeln!(stdin, "go").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "again");
    drop(stdin);
    assert!(py.wait().unwrap().success());
    eprintln!("RssAnon: {at_rest} KiB at rest, {busy} after the burst, {soon} 2 s later, {released} once idle");
}

/// `--busy-poll-us` backs off from a client that does not come back within the window (here
/// 3 ms between requests against a 1 ms window): after each poll in vain the connection skips
/// polling for twice as many requests as before, so of 300 requests at most 9 cost a window
/// of CPU (the probes at requests 1, 3, 6, 11, 20, 37, 70, 135, 264), where a fixed window
/// would burn 300 ms.
#[test]
fn busy_poll_backs_off_from_a_client_that_does_not_come_back_in_time() {
    const N: u64 = 300;
    let vol = Volume::new(16 << 20, 4096);
    let maddr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&vol, &["--busy-poll-us", "1000", "--metrics-listen", &maddr]);
    let script = "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
        h.pwrite(b'\\xa5' * (1 << 20), 0)\n\
        for i in range(int(sys.argv[2])):\n    \
            time.sleep(0.003)\n    \
            assert h.pread(4096, (i % 256) * 4096) == b'\\xa5' * 4096\n\
        print('ok')";
    let out = check(run(PY, &["-c", script, &d.uri, &N.to_string()]), "slow QD1 reads");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    d.wait_for_log("\"busy poll\"");
    // Summed over the connections (one here: the harness waits for the log's "ready" line).
    let [hits, misses, skipped] =
        ["hits", "misses", "skipped"].map(|k| log_fields(&d, &["busy poll"], k).iter().sum::<u64>());
    eprintln!("busy poll: {hits} hits, {misses} misses, {skipped} skipped of {N} requests");
    // The handshake's quiet period and the write add one period or two.
    assert!(misses <= 12, "polled in vain {misses} times");
    assert!(skipped >= N - 20, "skipped only {skipped} of {N} quiet periods");
    // The export's metrics count the same (the connection's log line comes after its last).
    let s = Scrape::get(&format!("http://{maddr}/metrics"));
    for (outcome, n) in [("hit", hits), ("miss", misses), ("skipped", skipped)] {
        let m = s.value("nbdcrypt_busy_polls_total", &[("export", "t"), ("outcome", outcome)]);
        assert_eq!(m, n as f64, "{outcome}");
    }
    assert_eq!(d.stop(), 0);
}

/// Voluntary context switches of the daemon's connection threads (`nbdcrypt-conn-N`).
fn connection_thread_sleeps(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("nbdcrypt-conn-") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap_or("x 0");
        total += line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    }
    total
}

/// `--busy-poll-us`: a client at queue depth 1 that comes back within the window finds the
/// connection's thread awake (it sleeps less than once per 4 requests, and less than a quarter
/// as often as without polling), and gets its data. The daemon and the client are pinned to
/// different CPUs: on one CPU the next request can arrive before the thread sleeps, polling or
/// not (under CI's load, unpinned, it slept 0.005 times per request without polling).
#[test]
fn busy_poll_keeps_the_connection_thread_awake_between_requests() {
    const N: u64 = 3000;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let vol = Volume::new(16 << 20, 4096);
    let script = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nn = int(sys.argv[2])\n\
        h.pwrite(b'\\x5a' * (1 << 20), 0)\n\
        for i in range(n):\n    \
            assert h.pread(4096, (i % 256) * 4096) == b'\\x5a' * 4096\n\
        print('ok')";
    let mut per_request = Vec::new();
    for poll in ["0", "1000"] {
        let d = Daemon::try_start_wrapped(&["taskset", "-c", "1"], &vol, &["--busy-poll-us", poll])
            .unwrap_or_else(|log| panic!("daemon did not start:\n{log}"));
        let before = connection_thread_sleeps(d.child.id());
        let out = check(run("taskset", &["-c", "0", PY, "-c", script, &d.uri, &N.to_string()]), "QD1 reads");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        let sleeps = connection_thread_sleeps(d.child.id()) - before;
        per_request.push(sleeps as f64 / N as f64);
        if poll != "0" {
            // The client's turnaround fits the window: the poll caught (nearly) every request.
            d.wait_for_log("\"busy poll\"");
            let hits: u64 = log_fields(&d, &["busy poll"], "hits").iter().sum();
            assert!(hits > N * 9 / 10, "busy poll caught {hits} of {N} requests");
        }
        assert_eq!(d.stop(), 0);
    }
    eprintln!("connection thread sleeps per request: {per_request:?} (without, with busy poll)");
    assert!(per_request[1] < 0.25, "busy poll did not keep the thread awake: {per_request:?}");
    assert!(per_request[0] > 4.0 * per_request[1], "no difference busy poll made: {per_request:?}");
}
