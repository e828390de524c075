//! The daemon against real NBD clients: nbdinfo, nbdcopy, qemu-io, qemu-img, nbdsh (libnbd),
//! and an ext4 filesystem over nbdfuse + loop.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn nbdinfo_reports_size_and_flags() {
    let vol = Volume::new(64 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let out = check(run("nbdinfo", &["--json", &d.uri]), "nbdinfo");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], (64u64 << 20) - (2 << 20));
    for flag in ["can_flush", "can_fua", "can_multi_conn", "can_zero", "can_trim", "can_cache"] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(d.stop(), 0);
}

#[test]
fn nbdinfo_list_shows_the_export() {
    let vol = Volume::new(8 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let out = check(run("nbdinfo", &["--list", "--json", &format!("nbd://127.0.0.1:{}", d.port)]), "nbdinfo --list");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "t");
}

#[test]
fn read_only_export_refuses_writes() {
    let vol = Volume::new(8 << 20, 4096);
    let d = Daemon::start(&vol, &["--read-only"]);
    let out = check(run("nbdinfo", &["--json", &d.uri]), "nbdinfo");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    let w = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4096", &d.uri]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        text.to_lowercase().contains("read-only") || text.contains("not permitted") || !w.status.success(),
        "{text}"
    );
}

fn nbdcopy_round_trip(sector: u32, extra: &[&str]) {
    let vol = Volume::new(40 << 20, sector);
    let d = Daemon::start(&vol, extra);
    let size = 38usize << 20;
    let data = pseudo_random(size, sector as u64);
    let src = vol.path("src.bin");
    std::fs::write(&src, &data).unwrap();
    check(run("nbdcopy", &["--flush", src.to_str().unwrap(), &d.uri]), "nbdcopy in");
    let dst = vol.path("dst.bin");
    check(run("nbdcopy", &[&d.uri, dst.to_str().unwrap()]), "nbdcopy out");
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    assert_eq!(d.stop(), 0);
}

#[test]
fn nbdcopy_round_trip_4096_sectors() {
    nbdcopy_round_trip(4096, &[]);
}

#[test]
fn nbdcopy_round_trip_512_sectors() {
    nbdcopy_round_trip(512, &[]);
}

#[test]
fn nbdcopy_round_trip_direct_io() {
    for sector in [4096, 512] {
        nbdcopy_round_trip(sector, &["--direct"]);
    }
}

#[test]
fn qemu_io_writes_at_odd_512_byte_offsets() {
    for extra in [&[][..], &["--direct"][..]] {
        qemu_io_odd_offsets(extra);
    }
}

fn qemu_io_odd_offsets(extra: &[&str]) {
    let vol = Volume::new(16 << 20, 4096);
    let d = Daemon::start(&vol, extra);
    // Background pattern, then sub-sector writes straddling 4 KiB sectors, then checks of the
    // written bytes and of their untouched neighbours.
    let cmds = [
        "write -P 0x11 0 65536",
        "write -P 0xab 512 1536",
        "write -P 0xcd 7680 1024",
        "write -P 0xef 12800 8192",
        "write -z 30208 3584",
        "read -P 0x11 0 512",
        "read -P 0xab 512 1536",
        "read -P 0x11 2048 5632",
        "read -P 0xcd 7680 1024",
        "read -P 0x11 8704 4096",
        "read -P 0xef 12800 8192",
        "read -P 0x11 20992 9216",
        "read -P 0 30208 3584",
        "read -P 0x11 33792 31744",
        "flush",
    ];
    qemu_io_checked(&d.uri, &cmds);
}

/// Runs qemu-io's `cmds` against `uri`; fails the test on any failed command or pattern check.
fn qemu_io_checked(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = check(run("qemu-io", &args), "qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
}

#[test]
fn no_map_serves_the_volume_without_mapping_it() {
    for (extra, mapped) in [(&[][..], true), (&["--no-map"][..], false)] {
        let vol = Volume::new(8 << 20, 4096);
        let d = Daemon::start(&vol, extra);
        // The mapping is made when the volume opens; the writes and reads check that data
        // still round-trips in each mode (the second read finds the range cached).
        qemu_io_checked(
            &d.uri,
            &["write -P 0x5c 65536 262144", "read -P 0x5c 65536 262144", "read -P 0x5c 65536 262144"],
        );
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.child.id())).unwrap();
        let image = vol.image.canonicalize().unwrap();
        assert_eq!(maps.contains(image.to_str().unwrap()), mapped, "{extra:?}:\n{maps}");
        assert_eq!(d.log_text().contains("not mapped"), !mapped, "{}", d.log_text());
        assert_eq!(d.stop(), 0);
    }
}

/// How many of the daemon's threads have a name starting with `prefix`, and their CPU time
/// (clock ticks). A thread that ends while being read is skipped.
fn threads_named(pid: u32, prefix: &str) -> (usize, u64) {
    let mut n = 0;
    let mut ticks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let dir = t.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else { continue };
        // Fields after the ")" that ends the name: utime and stime are the 12th and 13th.
        let rest: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        ticks += rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        n += 1;
    }
    (n, ticks)
}

/// CPU time (clock ticks) of the daemon's connection threads, and how many there are.
fn connection_threads(pid: u32) -> (usize, u64) {
    threads_named(pid, "nbdcrypt-conn-")
}

#[test]
fn connections_are_served_on_one_thread_per_core() {
    let vol = Volume::new(16 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let cores = std::thread::available_parallelism().unwrap().get();
    let (n, before) = connection_threads(d.child.id());
    assert_eq!(n, cores, "one connection thread per CPU");
    // 128 MiB of 4 MiB writes and as much read back: tens of milliseconds of CPU, on those
    // threads.
    let cmds: Vec<String> =
        (0..32).flat_map(|i| [format!("write -P {} 0 4M", i + 1), format!("read -P {} 0 4M", i + 1)]).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_checked(&d.uri, &cmds);
    let (_, after) = connection_threads(d.child.id());
    assert!(after > before, "the connection threads did no work ({before} -> {after} ticks)");
    assert_eq!(d.stop(), 0);
}

/// `--io-threads` bounds the threads waiting on the device: with `--direct` every read goes
/// to the blocking pools, and 128 reads in flight would otherwise start a thread each.
#[test]
fn direct_io_runs_on_at_most_io_threads_threads() {
    let vol = Volume::new(64 << 20, 4096);
    let d = Daemon::start(&vol, &["--direct", "--io-threads", "4"]);
    let cores = std::thread::available_parallelism().unwrap().get();
    // Shared evenly by the connection threads, rounded up.
    let cap = 4usize.div_ceil(cores) * cores;
    // Logged once the listeners run, which may be just after "ready".
    d.wait_for_log(&format!("\"io_threads\":{cap}"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = d.child.id();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(threads_named(pid, "nbdcrypt-io-").0);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            most
        })
    };
    check(
        run(
            "fio",
            &[
                "--name=r",
                "--ioengine=nbd",
                &format!("--uri={}", d.uri),
                "--rw=randread",
                "--bs=4k",
                "--iodepth=64",
                "--numjobs=2",
                "--time_based",
                "--runtime=3",
            ],
        ),
        "fio",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!((1..=cap).contains(&most), "{most} blocking threads at once, cap {cap}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn qemu_img_convert_and_compare() {
    let vol = Volume::new(24 << 20, 512);
    let d = Daemon::start(&vol, &[]);
    let src = vol.path("src.raw");
    let data = pseudo_random(22 << 20, 77);
    std::fs::write(&src, &data).unwrap();
    check(
        run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &d.uri]),
        "qemu-img convert",
    );
    check(run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &d.uri]), "qemu-img compare");
}

#[test]
fn nbdsh_many_concurrent_requests_match_a_shadow_copy() {
    for (sector, extra) in [(4096u32, &[][..]), (512, &[][..]), (512, &["--direct"][..]), (4096, &["--no-map"][..])] {
        let vol = Volume::new(12 << 20, sector);
        let d = Daemon::start(&vol, extra);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/nbd_shadow_workload.py");
        let out = run("/usr/bin/python3", &[script, &d.uri, "3000", &sector.to_string()]);
        assert!(
            out.status.success(),
            "nbd_shadow_workload.py failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(d.stop(), 0);
    }
}

#[test]
fn mkfs_ext4_mount_and_verify_across_a_restart() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/e2e/mkfs-over-nbd.sh");
    if std::env::var_os("NBDCRYPT_SKIP_E2E").is_some() {
        eprintln!("skipped by NBDCRYPT_SKIP_E2E");
        return;
    }
    assert!(std::path::Path::new(script).exists(), "{script} missing (../shared beside the checkout)");
    let vol = Volume::new(256 << 20, 4096);
    let state = vol.path("manifest");
    let d = Daemon::start(&vol, &[]);
    let uri = d.uri.clone();
    let w = std::process::Command::new("bash")
        .arg(script)
        .arg(&uri)
        .env("PHASE", "write")
        .env("STATE", &state)
        .output()
        .unwrap();
    assert!(
        w.status.success(),
        "write phase:\n{}\n{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert_eq!(d.stop(), 0);
    // Same port again, so the manifest's URI still applies.
    let port = uri.split(':').nth(2).unwrap().split('/').next().unwrap().to_string();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::spawn(
        &[
            "serve",
            vol.image.to_str().unwrap(),
            "--export",
            "t",
            "--listen",
            &listen,
            "--kek-file",
            vol.kek.to_str().unwrap(),
        ],
        vol.dir.path(),
        uri.clone(),
        port.parse().unwrap(),
    )
    .unwrap();
    let v = std::process::Command::new("bash")
        .arg(script)
        .arg(&uri)
        .env("PHASE", "verify")
        .env("STATE", &state)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "verify phase:\n{}\n{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert_eq!(d.stop(), 0);
}

/// A block device that falls behind: writeback at about 5 MB/s (nbdkit's memory plugin behind
/// its rate filter, seen as a file through nbdfuse, on a loop device), with the kernel's
/// dirty-page allowance for it capped at 64 MiB, so a fast writer is throttled within
/// seconds, as on a slow cloud volume. Torn down (and the device's limits restored) on drop.
struct SlowDevice {
    dir: tempfile::TempDir,
    nbdkit: std::process::Child,
    fuse: std::process::Child,
    dev: String,
    /// The loop device's writeback settings (`/sys/block/loopN/bdi`), if changed.
    bdi: Option<std::path::PathBuf>,
}

impl SlowDevice {
    /// `None` (the test is skipped) without root, or on a kernel without per-device dirty
    /// limits (`max_bytes`, Linux 6.2).
    fn new() -> Option<SlowDevice> {
        if !rustix::process::geteuid().is_root() || std::env::var_os("NBDCRYPT_SKIP_E2E").is_some() {
            eprintln!("skipped: needs root (loop device, FUSE) and no NBDCRYPT_SKIP_E2E");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("slow.sock");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let nbdkit = std::process::Command::new("nbdkit")
            .args(["-f", "-U", sock.to_str().unwrap(), "--filter=rate", "memory", "256M", "rate=40M"])
            .spawn()
            .expect("nbdkit");
        wait_for(&sock);
        let fuse = std::process::Command::new("nbdfuse")
            .arg(&mnt)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .spawn()
            .expect("nbdfuse");
        let file = mnt.join("nbd");
        wait_for(&file);
        let out = check(run("losetup", &["-f", "--show", file.to_str().unwrap()]), "losetup");
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mut d = SlowDevice { dir, nbdkit, fuse, dev, bdi: None };
        let bdi = std::path::Path::new("/sys/block").join(d.dev.trim_start_matches("/dev/")).join("bdi");
        if !bdi.join("max_bytes").exists() {
            eprintln!("skipped: no per-device dirty limits (max_bytes) on this kernel");
            return None;
        }
        d.bdi = Some(bdi.clone());
        std::fs::write(bdi.join("strict_limit"), "1").unwrap();
        std::fs::write(bdi.join("max_bytes"), (64u64 << 20).to_string()).unwrap();
        Some(d)
    }
}

impl Drop for SlowDevice {
    fn drop(&mut self) {
        // Back to a loop device's defaults. (Not the values read before: `max_bytes` reads
        // back as a share of the system's dirty limit, which moves with free memory.)
        if let Some(bdi) = &self.bdi {
            let _ = std::fs::write(bdi.join("max_ratio"), "100");
            let _ = std::fs::write(bdi.join("strict_limit"), "0");
        }
        let _ = run("losetup", &["-d", &self.dev]);
        let _ = run("fusermount3", &["-u", self.dir.path().join("mnt").to_str().unwrap()]);
        for child in [&mut self.fuse, &mut self.nbdkit] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The first CPU this process may run on (a cpuset may exclude CPU 0).
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    list.split([',', '-']).next().unwrap().to_owned()
}

/// While the raw volume throttles one connection's writes, the connection thread does not sit
/// in dirty throttling, so another connection on it goes on reading cached data: the
/// throttled writes leave the thread (`export::backpressure`). Written inline, they kept the
/// thread in `balance_dirty_pages` and held each read up to 200 ms (about 25 reads per second
/// against 14,000).
#[test]
fn throttled_writes_do_not_stall_reads_on_the_same_thread() {
    let Some(slow) = SlowDevice::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("k.kek");
    check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
    let key = format!("local:{}", kek.display());
    check(nbdcrypt(&["format", &slow.dev, "--key", &key, "--sector-size", "4096", "--yes"]), "format");
    let vol = Volume { dir, image: slow.dev.clone().into(), kek };
    // One CPU: one connection thread, so both connections share it.
    let d = Daemon::try_start_wrapped(&["taskset", "-c", &first_allowed_cpu()], &vol, &[]).unwrap();
    let fio = |args: &[&str]| {
        let mut cmd = std::process::Command::new("fio");
        cmd.args(["--ioengine=nbd", &format!("--uri={}", d.uri), "--output-format=json"]).args(args);
        cmd
    };
    // The reader's 8 MiB, into the page cache.
    check(fio(&["--name=warm", "--rw=read", "--bs=1M", "--size=8M"]).output().unwrap(), "fio warm-up");
    let mut writer = fio(&[
        "--name=w",
        "--rw=write",
        "--bs=128k",
        "--iodepth=8",
        "--offset=64M",
        "--size=128M",
        "--time_based",
        "--runtime=12",
    ])
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Where the daemon's threads wait while the reader runs (`/proc/PID/task/*/wchan`).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = d.child.id();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::<String, u32>::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                    *seen.entry(format!("{} {}", comm.trim(), wchan.trim())).or_default() += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen
        })
    };
    let out = check(
        fio(&["--name=r", "--rw=randread", "--bs=4k", "--iodepth=1", "--size=8M", "--time_based", "--runtime=5"])
            .output()
            .unwrap(),
        "fio reader",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let waits = sampler.join().unwrap();
    assert!(writer.wait().unwrap().success(), "fio writer failed");
    // fio may print notes before its JSON.
    let json = out.stdout.iter().position(|&b| b == b'{').map_or(&[][..], |i| &out.stdout[i..]);
    let report: serde_json::Value = serde_json::from_slice(json)
        .unwrap_or_else(|e| panic!("fio's report: {e}\n{}", String::from_utf8_lossy(&out.stdout)));
    let iops = report["jobs"][0]["read"]["iops"].as_f64().unwrap();
    let log = d.log_text();
    assert!(log.contains("held a write up"), "the device never throttled the writer; the test proves nothing:\n{log}");
    // The connection thread's samples, and those in dirty throttling. (Not the read rate
    // alone: in 3 of about 45 runs beside other tests the reader's pages were read from the
    // device again, 16-30 reads per second, with the connection thread idle meanwhile; the
    // cause is outside the daemon and not found.)
    let conn = |wait: &str| -> u32 {
        waits.iter().filter(|(k, _)| k.starts_with("nbdcrypt-conn-") && k.ends_with(wait)).map(|(_, n)| n).sum()
    };
    let (samples, throttled) = (conn(""), conn(" balance_dirty_pages"));
    assert!(samples >= 50, "too few samples of the connection thread: {waits:#?}");
    assert!(
        throttled * 10 <= samples,
        "the connection thread sat in dirty throttling in {throttled} of {samples} samples; \
         reads of cached data meanwhile: {iops:.0} per second\nthread waits: {waits:#?}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("cached 4 KiB reads during throttled writes: {iops:.0} per second; connection thread throttled in {throttled} of {samples} samples");
    assert_eq!(d.stop(), 0);
    drop(slow);
}
