//! Migration and in-place (re/de)encryption, end to end with the real binary: an ext4 image
//! with known files goes through `migrate`, `encrypt`, `reencrypt`, `decrypt`; the result is
//! served by the real daemon, read back with `nbdcopy`, checked with `e2fsck -fn` and every
//! file's SHA-256 (`debugfs -R dump`). Crash tests SIGKILL the operation at deterministic
//! write counts (fault points) and at random times (with a throttle), resume, and compare the
//! served bytes with the original image byte for byte.
//!
//! `NBDCRYPT_CRASH_POINTS=N` (default 20) sets how many fault points each crash test uses.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// Filesystem size of the test image.
const FS: u64 = 16 * MIB;
/// Room an in-place encrypt needs at the end: 2 MiB shift + 3 MiB journal.
const RESERVE: u64 = 5 * MIB;

struct Fixture {
    dir: tempfile::TempDir,
    /// The plaintext ext4 image (FS bytes).
    image: PathBuf,
    /// (path in the filesystem, sha256) of every file put in it.
    files: Vec<(String, String)>,
    kek: PathBuf,
    kek2: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        let mut files = Vec::new();
        let specs: [(&str, usize, u64); 6] = [
            ("a.bin", 3 << 20, 1),
            ("sub/b.bin", 700_001, 2),
            ("sub/deeper/c.txt", 5, 3),
            ("zeros.bin", 2 << 20, 0),
            ("sub/d.bin", 1 << 20, 4),
            ("e.bin", 123_457, 5),
        ];
        for (name, len, seed) in specs {
            let data = if seed == 0 { vec![0u8; len] } else { pseudo_random(len, seed) };
            std::fs::write(root.join(name), &data).unwrap();
            files.push((format!("/{name}"), sha256_hex(&data)));
        }
        let image = dir.path().join("plain.img");
        let out = run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-d",
                root.to_str().unwrap(),
                image.to_str().unwrap(),
                &format!("{}k", FS >> 10),
            ],
        );
        check(out, "mkfs.ext4 -d");
        let kek = dir.path().join("k1.kek");
        let kek2 = dir.path().join("k2.kek");
        check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
        check(nbdcrypt(&["genkey", kek2.to_str().unwrap()]), "genkey");
        Fixture { dir, image, files, kek, kek2 }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self) -> String {
        format!("local:{}", self.kek.display())
    }

    fn key2(&self) -> String {
        format!("local:{}", self.kek2.display())
    }

    /// A target of FS + RESERVE bytes that `migrate` (with `extra` arguments) filled from the
    /// plaintext image.
    fn migrated(&self, name: &str, extra: &[&str]) -> PathBuf {
        let target = self.path(name);
        std::fs::File::create(&target).unwrap().set_len(FS + RESERVE).unwrap();
        let key = self.key();
        let base = ["migrate", "--from", self.image.to_str().unwrap(), "--to", target.to_str().unwrap(), "--key", &key];
        check(nbdcrypt(&[&base[..], extra].concat()), "migrate");
        target
    }

    /// A copy of the plaintext image grown by `extra` zero bytes.
    fn plain_copy(&self, name: &str, extra: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::copy(&self.image, &p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(FS + extra).unwrap();
        p
    }

    /// Checks a plaintext ext4 image file: e2fsck -fn and every file's checksum.
    fn check_fs(&self, img: &Path) {
        check(run("e2fsck", &["-fn", img.to_str().unwrap()]), "e2fsck -fn");
        for (name, sum) in &self.files {
            let out = self.path("dumped");
            let _ = std::fs::remove_file(&out);
            let cmd = format!("dump {name} {}", out.display());
            check(run("debugfs", &["-R", &cmd, img.to_str().unwrap()]), "debugfs dump");
            assert_eq!(&sha256_hex(&std::fs::read(&out).unwrap()), sum, "{name} differs");
        }
    }
}

/// Serves `image` with `kek`, reads the whole export with nbdcopy, stops the daemon.
fn read_served(dir: &Path, image: &Path, kek: &Path) -> Vec<u8> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args =
        ["serve", image.to_str().unwrap(), "--export", "t", "--listen", &listen, "--kek-file", kek.to_str().unwrap()];
    // A loaded machine can delay startup past the harness's 20 s; a real failure fails 5 times.
    let mut tries = 0;
    let d = loop {
        match Daemon::spawn(&args, dir, format!("nbd://127.0.0.1:{port}/t"), port) {
            Ok(d) => break d,
            Err(l) if tries < 4 && l.starts_with("timeout") => tries += 1,
            Err(l) => panic!("serve: {l}"),
        }
    };
    let out = dir.join("served.img");
    let _ = std::fs::remove_file(&out);
    check(run("nbdcopy", &[&d.uri, out.to_str().unwrap()]), "nbdcopy");
    assert_eq!(d.stop(), 0);
    std::fs::read(&out).unwrap()
}

fn nbdcrypt_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env("NBDCRYPT_LOG", "info").env("NBDCRYPT_PROGRESS_SECS", "0.2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn crash_points() -> u64 {
    std::env::var("NBDCRYPT_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

fn killed(o: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.status.signal() == Some(9)
}

#[test]
fn migrate_a_file_verify_and_serve() {
    let fx = Fixture::new();
    let target = fx.path("target.img");
    std::fs::File::create(&target).unwrap().set_len(FS + RESERVE).unwrap();
    let out = check(
        nbdcrypt(&[
            "migrate",
            "--from",
            fx.image.to_str().unwrap(),
            "--to",
            target.to_str().unwrap(),
            "--key",
            &fx.key(),
            "--verify",
        ]),
        "migrate",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    let served = read_served(fx.dir.path(), &target, &fx.kek);
    assert_eq!(served.len() as u64, FS, "the export has the source's size");
    assert!(served == std::fs::read(&fx.image).unwrap(), "served bytes differ from the source");
    let copy = fx.path("served-copy.img");
    std::fs::write(&copy, &served).unwrap();
    fx.check_fs(&copy);
    // Running it again is refused (complete), --verify alone re-checks.
    let again = nbdcrypt(&[
        "migrate",
        "--from",
        fx.image.to_str().unwrap(),
        "--to",
        target.to_str().unwrap(),
        "--key",
        &fx.key(),
    ]);
    assert_eq!(again.status.code(), Some(5));
    check(
        nbdcrypt(&[
            "migrate",
            "--from",
            fx.image.to_str().unwrap(),
            "--to",
            target.to_str().unwrap(),
            "--key",
            &fx.key(),
            "--verify",
        ]),
        "migrate --verify on a complete target",
    );
}

#[test]
fn migrate_from_an_nbd_source_resumes_after_kill() {
    let fx = Fixture::new();
    let sock = fx.path("src.sock");
    let mut nbdkit = Command::new("nbdkit")
        .args(["-f", "-r", "-U", sock.to_str().unwrap(), "file", fx.image.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    // The socket file appears at bind(), before nbdkit listens: wait for a connection.
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let target = fx.path("target.img");
    std::fs::File::create(&target).unwrap().set_len(FS + RESERVE).unwrap();
    let args = ["migrate", "--from", &uri, "--to", target.to_str().unwrap(), "--key", &fx.key()];
    // Checkpoint every MiB; die before the 6th write (3 for the header, then data and
    // checkpoints).
    let env = [("NBDCRYPT_CHECKPOINT_MIB", "1".to_string()), ("NBDCRYPT_FAULT_KILL_AFTER_WRITES", "5".to_string())];
    let o = nbdcrypt_env(&args, &env);
    assert!(killed(&o), "expected a SIGKILL: {}", String::from_utf8_lossy(&o.stderr));
    // A half-migrated target is not served.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let refused =
        nbdcrypt(&["serve", target.to_str().unwrap(), "--listen", &listen, "--kek-file", fx.kek.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unfinished"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let o = check(nbdcrypt_env(&args, &[("NBDCRYPT_CHECKPOINT_MIB", "1".to_string())]), "migrate (resume)");
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming"), "{}", String::from_utf8_lossy(&o.stderr));
    check(nbdcrypt(&[&args[..], &["--verify"]].concat()), "migrate --verify");
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    assert!(read_served(fx.dir.path(), &target, &fx.kek) == std::fs::read(&fx.image).unwrap());
}

/// Bytes of storage a file holds (its blocks), as `du` counts them.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn zero_sectors_flag(image: &Path) -> bool {
    let out = check(nbdcrypt(&["inspect", image.to_str().unwrap(), "--json"]), "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["zero_sectors"].as_bool().unwrap()
}

#[test]
fn sparse_migration_keeps_holes_and_reads_back_through_reencrypt_and_decrypt() {
    let fx = Fixture::new();
    let plain = std::fs::read(&fx.image).unwrap();
    let migrate = |name: &str, extra: &[&str]| fx.migrated(name, &[&["--verify"], extra].concat());
    // The ext4 image is mostly zeros (free space, a 2 MiB file of zeros): the target keeps
    // them as holes, at most the header (2 MiB) and some slack more than the image itself.
    let sparse = migrate("sparse.img", &[]);
    assert!(zero_sectors_flag(&sparse));
    let (img_alloc, sparse_alloc) = (allocated(&fx.image), allocated(&sparse));
    assert!(sparse_alloc <= img_alloc + 3 * MIB, "target holds {sparse_alloc} bytes, the image {img_alloc}");
    assert!(read_served(fx.dir.path(), &sparse, &fx.kek) == plain, "sparse target serves different bytes");
    // --no-sparse encrypts the zeros too: every byte of the data area is allocated.
    let dense = migrate("dense.img", &["--no-sparse"]);
    assert!(!zero_sectors_flag(&dense));
    assert!(allocated(&dense) >= FS, "a --no-sparse target holds only {} bytes", allocated(&dense));
    assert!(read_served(fx.dir.path(), &dense, &fx.kek) == plain);
    // Reencrypt reads the holes as zeros and writes real ciphertext everywhere: no flag after.
    let s = sparse.to_str().unwrap();
    check(nbdcrypt(&["reencrypt", s, "--key", &fx.key(), "--new-key", &fx.key2()]), "reencrypt of a sparse volume");
    assert!(!zero_sectors_flag(&sparse));
    assert!(read_served(fx.dir.path(), &sparse, &fx.kek2) == plain, "re-encrypted sparse volume differs");
    // Decrypt straight from a sparse volume: its holes become plaintext zeros.
    let sparse2 = migrate("sparse2.img", &[]);
    check(nbdcrypt(&["decrypt", sparse2.to_str().unwrap(), "--key", &fx.key()]), "decrypt of a sparse volume");
    let back = std::fs::read(&sparse2).unwrap();
    assert!(back[..FS as usize] == plain[..], "decrypted sparse volume differs");
}

#[test]
fn encrypt_reencrypt_decrypt_in_place_keep_the_filesystem() {
    let fx = Fixture::new();
    let dev = fx.plain_copy("dev.img", RESERVE);
    let d = dev.to_str().unwrap();
    check(nbdcrypt(&["encrypt", d, "--key", &fx.key()]), "encrypt");
    let served = read_served(fx.dir.path(), &dev, &fx.kek);
    assert_eq!(served.len() as u64, FS);
    let plain = std::fs::read(&fx.image).unwrap();
    assert!(served == plain, "encrypted volume serves different bytes");
    // The raw device no longer holds the files' plaintext.
    let raw = std::fs::read(&dev).unwrap();
    let needle = &pseudo_random(4096, 1)[..64];
    assert!(!raw.windows(64).any(|w| w == needle), "plaintext left on the raw device");

    check(nbdcrypt(&["reencrypt", d, "--key", &fx.key(), "--new-key", &fx.key2()]), "reencrypt");
    let old = nbdcrypt(&["decrypt", d, "--key", &fx.key()]);
    assert_eq!(old.status.code(), Some(3), "the old KEK must no longer open the volume");
    assert!(read_served(fx.dir.path(), &dev, &fx.kek2) == plain, "re-encrypted volume serves different bytes");

    check(nbdcrypt(&["decrypt", d, "--key", &fx.key2()]), "decrypt");
    let back = std::fs::read(&dev).unwrap();
    assert!(back[..FS as usize] == plain[..], "decrypted bytes differ");
    let img = fx.path("decrypted.img");
    std::fs::write(&img, &back[..FS as usize]).unwrap();
    fx.check_fs(&img);
}

#[test]
fn encrypt_refuses_a_filesystem_that_fills_the_device() {
    let fx = Fixture::new();
    let dev = fx.plain_copy("full.img", MIB);
    let o = nbdcrypt(&["encrypt", dev.to_str().unwrap(), "--key", &fx.key()]);
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shrink the filesystem"));
    assert!(std::fs::read(&dev).unwrap()[..FS as usize] == std::fs::read(&fx.image).unwrap()[..], "device touched");
}

/// SIGKILLs `args` at `points` deterministic write counts and a few random times, resumes
/// each, and checks the served bytes equal the original image.
/// `writes` is how many device writes an uninterrupted run does (16 MiB in 256 KiB chunks:
/// encrypt 2 + 64 x 2 + 7, reencrypt 2 + 2 + 64 x 3 + 1 + 6): the fault points are spread
/// over all of them, the start and the finalisation included.
fn crash_test(fx: &Fixture, fresh: &dyn Fn(&str) -> PathBuf, op: &[&str], kek_after: &Path, writes: u64) {
    let plain = std::fs::read(&fx.image).unwrap();
    let env_chunk = ("NBDCRYPT_CHUNK_KIB", "256".to_string());
    let n = crash_points();
    // NBDCRYPT_CRASH_FROM=k skips the first k points (to finish an interrupted long run).
    let from: u64 = std::env::var("NBDCRYPT_CRASH_FROM").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut kills = 0;
    for i in from..n {
        let dev = fresh("crash.img");
        let args: Vec<&str> = [&op[..1], &[dev.to_str().unwrap()], &op[1..]].concat();
        let point = (i * writes / n.max(1) + i % 3) % writes;
        let o = nbdcrypt_env(&args, &[env_chunk.clone(), ("NBDCRYPT_FAULT_KILL_AFTER_WRITES", point.to_string())]);
        let killed_now = killed(&o);
        if killed_now {
            kills += 1;
        } else {
            check(o, "run that was not killed");
        }
        check(nbdcrypt_env(&args, std::slice::from_ref(&env_chunk)), "resume after a fault point");
        let served = read_served(fx.dir.path(), &dev, kek_after);
        assert!(served == plain, "{op:?}: fault point {point}: served bytes differ after resume");
        eprintln!("{}: fault point {i}/{n} (write {point}): killed={killed_now}, resumed, bytes identical", op[0]);
    }
    assert!(kills >= (n - from.min(n)) * 3 / 4, "only {kills} of {n} fault points killed the run");
    // Random SIGKILLs in real time, throttled so they land mid-operation.
    let mut x = 0x9E37_79B9u64;
    for _ in 0..5 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let dev = fresh("crash.img");
        let args: Vec<&str> = [&op[..1], &[dev.to_str().unwrap()], &op[1..]].concat();
        let mut child = Command::new(bin())
            .args(&args)
            .env("NBDCRYPT_CHUNK_KIB", "256")
            .env("NBDCRYPT_THROTTLE_MS", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + x % 250));
        let _ = child.kill();
        let _ = child.wait();
        check(nbdcrypt_env(&args, std::slice::from_ref(&env_chunk)), "resume after a random SIGKILL");
        assert!(read_served(fx.dir.path(), &dev, kek_after) == plain, "{op:?}: random kill: served bytes differ");
        eprintln!("{}: random SIGKILL after {} ms, resumed, bytes identical", op[0], 30 + x % 250);
    }
}

#[test]
fn encrypt_in_place_survives_kill_9_anywhere() {
    let fx = Fixture::new();
    let key = fx.key();
    crash_test(&fx, &|name| fx.plain_copy(name, RESERVE), &["encrypt", "--key", &key], &fx.kek, 137);
}

#[test]
fn reencrypt_survives_kill_9_anywhere() {
    let fx = Fixture::new();
    let base = fx.migrated("enc-base.img", &[]);
    let fresh = |name: &str| {
        let p = fx.path(name);
        std::fs::copy(&base, &p).unwrap();
        p
    };
    let (k1, k2) = (fx.key(), fx.key2());
    crash_test(&fx, &fresh, &["reencrypt", "--key", &k1, "--new-key", &k2], &fx.kek2, 203);
}

#[test]
fn offline_operations_refuse_a_served_volume() {
    let fx = Fixture::new();
    let target = fx.migrated("t.img", &[]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "serve",
        target.to_str().unwrap(),
        "--export",
        "t",
        "--listen",
        &listen,
        "--kek-file",
        fx.kek.to_str().unwrap(),
    ];
    let d = Daemon::spawn(&args, fx.dir.path(), format!("nbd://127.0.0.1:{port}/t"), port).unwrap();
    let o = nbdcrypt(&["reencrypt", target.to_str().unwrap(), "--key", &fx.key()]);
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    // A second writable daemon on the same volume is refused too.
    let port2 = free_port();
    let listen2 = format!("127.0.0.1:{port2}");
    let second =
        nbdcrypt(&["serve", target.to_str().unwrap(), "--listen", &listen2, "--kek-file", fx.kek.to_str().unwrap()]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"), "{}", String::from_utf8_lossy(&second.stderr));
    // Key management only changes the header, and keeps working on a served volume.
    let kek2 = fx.path("second.kek");
    check(nbdcrypt(&["genkey", kek2.to_str().unwrap()]), "genkey");
    let key2 = format!("local:{}", kek2.display());
    check(
        nbdcrypt(&["keyslot", "add", target.to_str().unwrap(), "--key", &key2, "--kek-file", fx.kek.to_str().unwrap()]),
        "keyslot add on a served volume",
    );
    let list = check(nbdcrypt(&["keyslot", "list", target.to_str().unwrap()]), "keyslot list");
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(listed.matches("  slot ").count(), 2, "{listed}");
    assert_eq!(d.stop(), 0);
    // The new slot unlocks the volume, and the data is intact.
    assert!(read_served(fx.dir.path(), &target, &kek2) == std::fs::read(&fx.image).unwrap());
}

/// Every shell script the project ships or runs: deploy, benches, the test runner, CI.
#[test]
fn shell_scripts_parse_and_pass_shellcheck() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = vec![root.join(".ci/run")];
    for dir in ["deploy", "benches", "tests"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "sh") {
                scripts.push(e.path());
            }
        }
    }
    assert!(scripts.len() >= 8, "{scripts:?}");
    for p in scripts {
        let p = p.to_str().unwrap();
        check(run("bash", &["-n", p]), "bash -n");
        check(run("shellcheck", &[p]), "shellcheck");
    }
}
