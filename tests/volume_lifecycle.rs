//! Format, serve, restart, refuse: the volume's life as an operator sees it.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn write_pattern(d: &Daemon, vol: &Volume, pattern: &[u8], offset: u64) {
    let src = vol.path("pattern.bin");
    std::fs::write(&src, pattern).unwrap();
    let cmd = format!("write -s {} {} {}", src.display(), offset, pattern.len());
    let out = check(run("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &d.uri]), "qemu-io write");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

fn read_back(d: &Daemon, vol: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let dst = vol.path("readback.bin");
    let _ = std::fs::remove_file(&dst);
    let uri = d.uri.clone();
    // nbdcopy reads the whole export; slice it.
    check(run("nbdcopy", &[&uri, dst.to_str().unwrap()]), "nbdcopy out");
    let all = std::fs::read(&dst).unwrap();
    all[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn raw_volume_never_holds_the_plaintext() {
    let vol = Volume::new(16 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let marker = b"NBDCRYPT-PLAINTEXT-MARKER-0123456789abcdef".repeat(100);
    write_pattern(&d, &vol, &marker, 1 << 20);
    write_pattern(&d, &vol, &marker, 12345 * 512);
    assert_eq!(d.stop(), 0);
    let raw = std::fs::read(&vol.image).unwrap();
    let needle = &marker[..32];
    assert!(!raw.windows(needle.len()).any(|w| w == needle), "plaintext found in the raw volume");
    // And the key file's bytes appear nowhere in the volume either.
    let kek = std::fs::read(&vol.kek).unwrap();
    assert!(!raw.windows(16).any(|w| w == &kek[..16]), "KEK bytes found in the raw volume");
}

#[test]
fn data_survives_a_restart() {
    let vol = Volume::new(16 << 20, 512);
    let data = pseudo_random(3 << 20, 5);
    let d = Daemon::start(&vol, &[]);
    write_pattern(&d, &vol, &data, 4 << 20);
    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&vol, &[]);
    assert_eq!(read_back(&d, &vol, 4 << 20, data.len()), data);
    assert_eq!(d.stop(), 0);
}

#[test]
fn wrong_kek_is_refused_with_exit_code_3() {
    let vol = Volume::new(8 << 20, 4096);
    let other = vol.path("other.kek");
    check(nbdcrypt(&["genkey", other.to_str().unwrap()]), "genkey");
    let out = nbdcrypt(&[
        "serve",
        vol.image.to_str().unwrap(),
        "--kek-file",
        other.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no key slot could be unlocked"), "{err}");
}

#[test]
fn tampered_header_is_refused_with_exit_code_4() {
    let vol = Volume::new(8 << 20, 4096);
    // Rewrite the trusted geometry in both copies consistently (fixing their checksums is
    // what an attacker with disk access can do); the MAC keyed from the volume key catches it.
    let script = r#"
import hashlib, json, struct, sys
p = sys.argv[1]
f = open(p, 'r+b')
for base in (0, 1 << 20):
    f.seek(base); blk = bytearray(f.read(4096))
    n = struct.unpack('>I', blk[12:16])[0]
    f.seek(base + 4096); js = json.loads(f.read(n))
    js['sector_size'] = 512
    new = json.dumps(js, separators=(',', ':')).encode()
    blk[12:16] = struct.pack('>I', len(new)); blk[48:80] = bytes(32)
    blk[48:80] = hashlib.sha256(bytes(blk) + new).digest()
    f.seek(base); f.write(bytes(blk)); f.write(new); f.write(bytes(4096))
f.close()
"#;
    check(run("python3", &["-c", script, vol.image.to_str().unwrap()]), "tamper script");
    let out = nbdcrypt(&[
        "serve",
        vol.image.to_str().unwrap(),
        "--kek-file",
        vol.kek.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tampered"));
}

#[test]
fn damaged_primary_header_opens_from_the_secondary() {
    let vol = Volume::new(8 << 20, 4096);
    let mut raw = std::fs::read(&vol.image).unwrap();
    raw[0..4096].fill(0x5a);
    std::fs::write(&vol.image, &raw).unwrap();
    let d = Daemon::start(&vol, &[]);
    assert!(d.log_text().contains("damaged"), "{}", d.log_text());
    let insp = check(nbdcrypt(&["inspect", vol.image.to_str().unwrap()]), "inspect");
    assert!(String::from_utf8_lossy(&insp.stdout).contains("damaged"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn format_refuses_a_device_with_data_or_a_header() {
    let vol = Volume::new(8 << 20, 4096);
    let key = format!("local:{}", vol.kek.display());
    let out = nbdcrypt(&["format", vol.image.to_str().unwrap(), "--key", &key]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an nbdcrypt header"));

    let ext = vol.path("ext4.img");
    std::fs::File::create(&ext).unwrap().set_len(8 << 20).unwrap();
    check(run("mkfs.ext4", &["-q", "-F", ext.to_str().unwrap()]), "mkfs.ext4");
    let out = nbdcrypt(&["format", ext.to_str().unwrap(), "--key", &key]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ext2/3/4"), "{}", String::from_utf8_lossy(&out.stderr));
    check(nbdcrypt(&["format", ext.to_str().unwrap(), "--key", &key, "--yes"]), "format --yes");
}

#[test]
fn genkey_refuses_to_overwrite() {
    let vol = Volume::new(4 << 20, 4096);
    let out = nbdcrypt(&["genkey", vol.kek.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn inspect_json_shows_geometry_and_no_key_material() {
    let vol = Volume::new(8 << 20, 512);
    let out = check(nbdcrypt(&["inspect", "--json", vol.image.to_str().unwrap()]), "inspect");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sector_size"], 512);
    assert_eq!(v["data_offset"], 2 << 20);
    assert_eq!(v["cipher"], "aes-xts-plain64");
    assert_eq!(v["slots"][0]["provider"], "local");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("wrapped\""), "inspect prints wrapped key bytes");
}

#[test]
fn sigterm_flushes_and_exits_zero_with_clients_connected() {
    let vol = Volume::new(8 << 20, 4096);
    let d = Daemon::start(&vol, &[]);
    let uri = d.uri.clone();
    // A client that keeps the connection open while the daemon is told to stop.
    let mut holder = std::process::Command::new("nbdsh")
        .args(["-u", &uri, "-c", "import time; h.pwrite(b'x'*4096, 0); time.sleep(30)"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(d.stop(), 0);
    let _ = holder.kill();
    let _ = holder.wait();
}
