//! Key slots, rewrap and header tools with local KEKs (no KMS needed): what an operator does
//! to rotate keys, keep a recovery path, and survive a damaged header.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::Value;

fn inspect(vol: &Volume) -> Value {
    let out = check(nbdcrypt(&["inspect", vol.image.to_str().unwrap(), "--json"]), "inspect");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn img(vol: &Volume) -> &str {
    vol.image.to_str().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Overwrites bytes inside a copy's checksummed area, as a bad sector or a stray write would.
fn damage(vol: &Volume, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&vol.image).unwrap();
    f.write_all_at(b"garbage garbage garbage", offset).unwrap();
    f.sync_all().unwrap();
}

fn write_pattern(d: &Daemon, vol: &Volume, data: &[u8], offset: u64) {
    let src = vol.path("pattern.bin");
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {} {}", src.display(), offset, data.len());
    check(run("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &d.uri]), "qemu-io write");
}

fn read_back(d: &Daemon, vol: &Volume, offset: usize, len: usize) -> Vec<u8> {
    let dst = vol.path("readback.bin");
    let _ = std::fs::remove_file(&dst);
    check(run("nbdcopy", &[&d.uri, dst.to_str().unwrap()]), "nbdcopy");
    std::fs::read(&dst).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn header_backup_damage_repair_restore_round_trip() {
    let vol = Volume::new(8 << 20, 4096);
    let data = pseudo_random(64 * 1024, 11);
    let d = Daemon::start(&vol, &[]);
    write_pattern(&d, &vol, &data, 1 << 20);
    assert_eq!(d.stop(), 0);

    // Backup: 1 MiB, mode 0600, never overwritten.
    let backup = vol.path("vol.header");
    check(nbdcrypt(&["header", "backup", img(&vol), backup.to_str().unwrap()]), "backup");
    let meta = std::fs::metadata(&backup).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (1 << 20, 0o600));
    let out = nbdcrypt(&["header", "backup", img(&vol), backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));

    // Damage the primary's JSON: the volume opens from the secondary; repair rewrites it.
    damage(&vol, 4096 + 10);
    assert!(inspect(&vol)["primary"].as_str().unwrap().starts_with("damaged"));
    let d = Daemon::start(&vol, &[]);
    assert!(d.log_text().contains("header repair"));
    assert_eq!(d.stop(), 0);
    let out = check(nbdcrypt(&["header", "repair", img(&vol)]), "repair");
    assert!(String::from_utf8_lossy(&out.stdout).contains("rewrote the primary"));
    let h = inspect(&vol);
    assert_eq!((h["primary"].as_str().unwrap(), h["secondary"].as_str().unwrap()), ("valid (seq 1)", "valid (seq 1)"));
    let out = check(nbdcrypt(&["header", "repair", img(&vol)]), "repair again");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to repair"));

    // A slot added after the backup disappears on restore (after confirmation).
    let second = vol.path("second.kek");
    check(nbdcrypt(&["genkey", second.to_str().unwrap()]), "genkey");
    let kek = vol.kek.to_str().unwrap();
    check(
        nbdcrypt(&["keyslot", "add", img(&vol), "--key", &format!("local:{}", second.display()), "--kek-file", kek]),
        "keyslot add",
    );
    assert_eq!(inspect(&vol)["slots"].as_array().unwrap().len(), 2);
    let out = nbdcrypt(&["header", "restore", backup.to_str().unwrap(), img(&vol)]);
    assert_eq!(out.status.code(), Some(5), "without a terminal or --yes: {}", stderr(&out));
    assert_eq!(inspect(&vol)["slots"].as_array().unwrap().len(), 2);
    let out = check(nbdcrypt(&["header", "restore", backup.to_str().unwrap(), img(&vol), "--yes"]), "restore");
    let err = stderr(&out);
    assert!(err.contains("revives") && err.contains("will be gone"), "{err}");
    let h = inspect(&vol);
    assert_eq!(h["slots"].as_array().unwrap().len(), 1);
    assert_eq!(h["sequence"], 3, "a restore is a new header version, above the current one");

    // Both copies destroyed: restore still knows the volume (uuid in the damaged block).
    damage(&vol, 100);
    damage(&vol, (1 << 20) + 100);
    let out = nbdcrypt(&["inspect", img(&vol)]);
    assert_eq!(out.status.code(), Some(4));
    check(nbdcrypt(&["header", "restore", backup.to_str().unwrap(), img(&vol), "--yes"]), "restore over damage");
    let d = Daemon::start(&vol, &[]);
    assert_eq!(read_back(&d, &vol, 1 << 20, data.len()), data);
    assert_eq!(d.stop(), 0);
}

#[test]
fn restore_refuses_another_volumes_backup() {
    let a = Volume::new(8 << 20, 4096);
    let b = Volume::new(8 << 20, 4096);
    let backup = a.path("a.header");
    check(nbdcrypt(&["header", "backup", img(&a), backup.to_str().unwrap()]), "backup");
    let out = nbdcrypt(&["header", "restore", backup.to_str().unwrap(), img(&b), "--yes"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("holds volume"), "{}", stderr(&out));
    // Also when b's header is too damaged to load.
    damage(&b, 100);
    damage(&b, (1 << 20) + 100);
    let out = nbdcrypt(&["header", "restore", backup.to_str().unwrap(), img(&b), "--yes"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    // Not a backup at all.
    let junk = a.path("junk");
    std::fs::write(&junk, b"not a header").unwrap();
    let out = nbdcrypt(&["header", "restore", junk.to_str().unwrap(), img(&a), "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn rewrap_a_local_slot_to_a_new_kek() {
    let vol = Volume::new(8 << 20, 512);
    let new = vol.path("new.kek");
    check(nbdcrypt(&["genkey", new.to_str().unwrap()]), "genkey");
    let to = format!("local:{}", new.display());
    // Without the old KEK the slot cannot be unwrapped to rewrap it.
    let out = nbdcrypt(&["rewrap", img(&vol), "--slot", "0", "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = check(
        nbdcrypt(&["rewrap", img(&vol), "--slot", "0", "--to", &to, "--kek-file", vol.kek.to_str().unwrap()]),
        "rewrap",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrapped again in memory"));
    // The old KEK no longer opens the volume; the new one does.
    let out = nbdcrypt(&["serve", img(&vol), "--listen", "127.0.0.1:0", "--kek-file", vol.kek.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["serve", img(&vol), "--export", "t", "--listen", &listen, "--kek-file", new.to_str().unwrap()];
    let d = Daemon::spawn(&args, vol.dir.path(), format!("nbd://127.0.0.1:{port}/t"), port).unwrap();
    assert_eq!(d.stop(), 0);
}

#[test]
fn keyslot_mistakes_are_refused() {
    let vol = Volume::new(8 << 20, 4096);
    let kek = vol.kek.to_str().unwrap();
    let out = nbdcrypt(&["keyslot", "remove", img(&vol), "--slot", "7", "--yes", "--kek-file", kek]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = nbdcrypt(&["keyslot", "remove", img(&vol), "--slot", "0", "--yes", "--kek-file", kek]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    // Adding needs an existing slot unlocked.
    let other = vol.path("other.kek");
    check(nbdcrypt(&["genkey", other.to_str().unwrap()]), "genkey");
    let out = nbdcrypt(&["keyslot", "add", img(&vol), "--key", &format!("local:{}", other.display())]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(inspect(&vol)["slots"].as_array().unwrap().len(), 1);
}
