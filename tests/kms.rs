//! The AWS KMS provider end to end: the real daemon against moto's KMS server, through a
//! fault-injecting proxy for what moto does not do (key states, throttling, slow answers).
//!
//! Tested against moto itself: GenerateDataKey, Decrypt, Encrypt, ReEncrypt, the encryption
//! context (moto checks it: a wrong one is InvalidCiphertextException), the region taken from
//! a key ARN, aliases, AWS_ENDPOINT_URL_KMS and --kms-endpoint. Through the proxy's injected
//! answers: DisabledException, KMSInvalidStateException (pending deletion),
//! AccessDeniedException, ThrottlingException, slow responses. With no server at all: the
//! endpoint down at start.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::kms::{closed_endpoint, KmsFixture, KmsVolume};
use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Serves `vol` with KMS at `endpoint`.
fn serve(kms: &KmsFixture, vol: &KmsVolume, endpoint: &str, extra: &[&str]) -> Result<Daemon, String> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", vol.image(), "--export", "t", "--listen", &listen];
    args.extend_from_slice(extra);
    Daemon::spawn_with(&args, vol.dir.path(), format!("nbd://127.0.0.1:{port}/t"), port, |c| {
        kms.configure(c, Some(endpoint))
    })
}

fn write_at(d: &Daemon, vol: &KmsVolume, data: &[u8], offset: u64) {
    let src = vol.path("pattern.bin");
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {} {}", src.display(), offset, data.len());
    let out = check(run("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &d.uri]), "qemu-io write");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

fn read_at(d: &Daemon, vol: &KmsVolume, offset: u64, len: usize) -> Vec<u8> {
    let dst = vol.path("readback.bin");
    let _ = std::fs::remove_file(&dst);
    check(run("nbdcopy", &[&d.uri, dst.to_str().unwrap()]), "nbdcopy");
    std::fs::read(&dst).unwrap()[offset as usize..offset as usize + len].to_vec()
}

fn inspect_json(kms: &KmsFixture, vol: &KmsVolume) -> Value {
    let out = check(kms.nbdcrypt(&["inspect", vol.image(), "--json"]), "inspect");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn format_serve_round_trip_with_kms() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 16 * MIB, 4096, &format!("aws-kms:{key}"), &["--context", "app=test"]);
    assert_eq!(kms.count("GenerateDataKey"), 1);
    let h = inspect_json(&kms, &vol);
    let slot = &h["slots"][0];
    assert_eq!(slot["provider"], "aws-kms");
    assert_eq!(slot["key_id"], key.as_str());
    assert_eq!(slot["context"]["nbdcrypt:volume"], h["uuid"]);
    assert_eq!(slot["context"]["app"], "test");

    let data = pseudo_random(MIB as usize + 4096, 7);
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    assert_eq!(kms.count("Decrypt"), 1);
    // Once open, the export never needs KMS: every KMS call now fails, and I/O goes on.
    kms.fault(json!({"op": "Decrypt", "kind": "error", "code": "AccessDeniedException"}));
    write_at(&d, &vol, &data, 3 * MIB);
    assert_eq!(read_at(&d, &vol, 3 * MIB, data.len()), data);
    assert_eq!(kms.count("Decrypt"), 1);
    let log = d.log_text();
    assert!(log.contains("key slot opened the volume") && log.contains("\"provider\":\"aws-kms\""), "{log}");
    assert_eq!(d.stop(), 0);

    kms.clear_faults();
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    assert_eq!(read_at(&d, &vol, 3 * MIB, data.len()), data);
    assert_eq!(d.stop(), 0);
}

#[test]
fn header_holds_no_plaintext_key_and_the_dumped_key_decrypts_the_data() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    for ss in [4096u32, 512] {
        let vol = KmsVolume::format(&kms, 16 * MIB, ss, &format!("aws-kms:{key}"), &[]);
        let data = pseudo_random(256 * 1024, u64::from(ss));
        let at = 5 * MIB + 8192;
        let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
        write_at(&d, &vol, &data, at);
        assert_eq!(d.stop(), 0);

        // Without --yes and without a terminal to confirm on, the key is not printed.
        let out = kms.nbdcrypt(&["inspect", vol.image(), "--dump-volume-key"]);
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
        assert!(out.stdout.is_empty());

        let out = check(kms.nbdcrypt(&["inspect", vol.image(), "--dump-volume-key", "--json", "--yes"]), "dump");
        let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
        let key_hex = dump["volume_key"].as_str().unwrap().to_owned();
        let vk = hex::decode(&key_hex).unwrap();
        assert_eq!(vk.len(), 64);
        assert_eq!(dump["sector_size"], ss);
        let data_offset = dump["data_offset"].as_u64().unwrap();
        assert_eq!(data_offset, 2 * MIB);
        let data_size = dump["data_size"].as_u64().unwrap();
        let opts = if ss == 512 { String::new() } else { format!(" 2 sector_size:{ss} iv_large_sectors") };
        assert_eq!(
            dump["dmcrypt_table"].as_str().unwrap(),
            format!(
                "0 {} crypt aes-xts-plain64 {key_hex} 0 {} {}{opts}",
                data_size / 512,
                vol.image(),
                data_offset / 512
            )
        );

        // Neither the key nor either XTS half, raw or in hex, is anywhere on the raw volume.
        let raw = std::fs::read(&vol.image).unwrap();
        for needle in [&vk[..], &vk[..32], &vk[32..], key_hex.as_bytes(), &key_hex.as_bytes()[..64]] {
            assert!(!raw.windows(needle.len()).any(|w| w == needle), "key material found in the raw volume");
        }

        // An independent AES-XTS (Python cryptography), sector by sector, reads what was written.
        let plain = vol.path("plain.bin");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/xts_decrypt.py");
        let args = [
            script,
            vol.image(),
            &key_hex,
            &data_offset.to_string(),
            &ss.to_string(),
            &at.to_string(),
            &data.len().to_string(),
            plain.to_str().unwrap(),
        ];
        check(run("python3", &args), "xts_decrypt.py");
        assert_eq!(std::fs::read(&plain).unwrap(), data, "sector size {ss}");
    }
}

#[test]
fn wrong_encryption_context_fails() {
    use nbdcrypt::backend::FileBackend;
    use nbdcrypt::header::store;

    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &["--context", "app=a"]);
    // Rewrite the slot's recorded context (slots are outside the MAC; the checksums are
    // recomputed by the store, as anyone with write access to the disk could).
    let dev = FileBackend::open(&vol.image, true).unwrap();
    let loaded = store::load(&dev).unwrap();
    let mut h = loaded.header.clone();
    h.slots[0].context.insert("app".into(), "b".into());
    store::update(&dev, &loaded, &mut h).unwrap();

    let out = kms.nbdcrypt(&["serve", vol.image(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("encryption context") && err.contains("InvalidCiphertextException"), "{err}");
    assert_eq!(kms.count("Decrypt"), 1, "a permanent error is not retried");
}

#[test]
fn disabled_key_fails_with_a_clear_message_and_is_not_retried() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    // moto keeps decrypting with a disabled key; the proxy answers as KMS does.
    kms.cmd(json!({"cmd": "disable-key", "key": key}));
    let msg = format!("{key} is disabled.");
    kms.fault(json!({"op": "Decrypt", "kind": "error", "code": "DisabledException", "message": msg}));
    let out = kms.nbdcrypt(&["serve", vol.image(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("is disabled") && err.contains("aws kms enable-key"), "{err}");
    assert_eq!(kms.count("Decrypt"), 1);
}

#[test]
fn pending_deletion_and_access_denied_are_typed() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    let cases = [
        ("KMSInvalidStateException", format!("{key} is pending deletion."), "cancel-key-deletion"),
        (
            "AccessDeniedException",
            "User is not authorized to perform kms:Decrypt".to_owned(),
            "access denied: kms:Decrypt",
        ),
        ("NotFoundException", format!("Key '{key}' does not exist"), "was not found"),
    ];
    for (code, message, expect) in cases {
        kms.clear_faults();
        kms.fault(json!({"op": "Decrypt", "kind": "error", "code": code, "message": message}));
        let out = kms.nbdcrypt(&["inspect", vol.image(), "--dump-volume-key", "--yes"]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{code}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn rewrap_with_reencrypt_to_a_second_key_then_serve() {
    let mut kms = KmsFixture::start();
    let (k1, k2) = (kms.create_key("us-east-1"), kms.create_key("us-east-1"));
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{k1}"), &["--context", "team=storage"]);
    let before = inspect_json(&kms, &vol);
    let data = pseudo_random(64 * 1024, 3);
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    write_at(&d, &vol, &data, MIB);
    assert_eq!(d.stop(), 0);
    let decrypts = kms.count("Decrypt");

    let out = check(kms.nbdcrypt(&["rewrap", vol.image(), "--slot", "0", "--to", &format!("aws-kms:{k2}")]), "rewrap");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ReEncrypt"));
    // Inside KMS only: no Decrypt, Encrypt or GenerateDataKey during the rewrap.
    assert_eq!(kms.count("ReEncrypt"), 1);
    assert_eq!(kms.count("Decrypt"), decrypts);
    assert_eq!(kms.count("Encrypt"), 0);
    let after = inspect_json(&kms, &vol);
    assert_eq!(after["slots"][0]["key_id"], k2.as_str());
    assert_eq!(after["slots"][0]["context"], before["slots"][0]["context"]);
    assert_eq!(after["sequence"].as_u64().unwrap(), before["sequence"].as_u64().unwrap() + 1);

    // The old key refuses everything from now on; the volume opens with the new one.
    kms.fault(json!({"op": "Decrypt", "kind": "error", "code": "DisabledException", "key": k1}));
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    assert_eq!(read_at(&d, &vol, MIB, data.len()), data);
    assert_eq!(d.stop(), 0);
}

#[test]
fn local_recovery_slot_then_remove_the_kms_slot_and_serve_from_recovery() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    let recovery = vol.path("recovery.kek");
    check(nbdcrypt(&["genkey", recovery.to_str().unwrap()]), "genkey");
    let data = pseudo_random(64 * 1024, 9);
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    write_at(&d, &vol, &data, 2 * MIB);
    assert_eq!(d.stop(), 0);

    let local = format!("local:{}", recovery.display());
    check(kms.nbdcrypt(&["keyslot", "add", vol.image(), "--key", &local]), "keyslot add");
    let out = check(kms.nbdcrypt(&["keyslot", "list", vol.image()]), "keyslot list");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(list.contains("slot 0: aws-kms") && list.contains("slot 1: local kek:"), "{list}");
    // Adding the same key twice is refused.
    let out = kms.nbdcrypt(&["keyslot", "add", vol.image(), "--key", &local]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // Removal asks; with no terminal and no --yes it refuses (5) and changes nothing.
    let kek = recovery.to_str().unwrap();
    let out = kms.nbdcrypt(&["keyslot", "remove", vol.image(), "--slot", "0", "--kek-file", kek]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(inspect_json(&kms, &vol)["slots"].as_array().unwrap().len(), 2);

    let out = kms.nbdcrypt(&["keyslot", "remove", vol.image(), "--slot", "0", "--kek-file", kek, "--yes"]);
    check(out, "keyslot remove");
    let h = inspect_json(&kms, &vol);
    assert_eq!(h["slots"].as_array().unwrap().len(), 1);
    assert_eq!(h["slots"][0]["provider"], "local");
    // The last slot is never removed.
    let out = kms.nbdcrypt(&["keyslot", "remove", vol.image(), "--slot", "1", "--kek-file", kek, "--yes"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("last key slot"));

    // Serve from the recovery key with KMS unreachable: KMS is not needed any more.
    let d = serve(&kms, &vol, &closed_endpoint(), &["--kek-file", kek]).unwrap();
    assert_eq!(read_at(&d, &vol, 2 * MIB, data.len()), data);
    assert!(d.log_text().contains("\"provider\":\"local\""));
    assert_eq!(d.stop(), 0);
}

#[test]
fn kms_slot_added_to_a_local_volume_opens_it() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("k.kek");
    check(nbdcrypt(&["genkey", kek.to_str().unwrap()]), "genkey");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("local:{}", kek.display()), &[]);
    let kek = kek.to_str().unwrap();
    let out = kms.nbdcrypt(&["keyslot", "add", vol.image(), "--key", &format!("aws-kms:{key}"), "--kek-file", kek]);
    check(out, "keyslot add aws-kms");
    // Wrapped with Encrypt, then checked with Decrypt before the header was written.
    assert_eq!((kms.count("Encrypt"), kms.count("Decrypt")), (1, 1));
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    assert!(d.log_text().contains("\"provider\":\"aws-kms\""));
    assert_eq!(d.stop(), 0);
}

#[test]
fn endpoint_down_at_start_gives_up_within_the_deadline() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    let started = Instant::now();
    let args = ["serve", vol.image(), "--listen", "127.0.0.1:0", "--kms-timeout", "3s"];
    let out = kms.nbdcrypt_at(&closed_endpoint(), &args);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot reach KMS") && err.contains("did not succeed within 3000 ms"), "{err}");
    let retries = err.matches("KMS call failed; retrying").count();
    assert!(retries >= 3, "{retries} retries:\n{err}");
    assert!(took >= Duration::from_millis(2500) && took < Duration::from_secs(6), "{took:?}");
}

#[test]
fn throttling_is_retried_then_succeeds() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    kms.fault(json!({"op": "Decrypt", "kind": "error", "code": "ThrottlingException", "message": "Rate exceeded", "count": 3}));
    let d = serve(&kms, &vol, &kms.proxy_url(), &[]).unwrap();
    assert_eq!(kms.count("Decrypt"), 4);
    let log = d.log_text();
    assert_eq!(log.matches("KMS call failed; retrying").count(), 3, "{log}");
    assert!(log.contains("KMS call succeeded after retrying"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_slow_answer_is_cut_off_and_retried() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    // With a 6 s deadline an attempt gets 2 s; the first answer would take 20 s.
    kms.fault(json!({"op": "Decrypt", "kind": "delay", "delay": 20.0, "count": 1}));
    let started = Instant::now();
    let d = serve(&kms, &vol, &kms.proxy_url(), &["--kms-timeout", "6s"]).unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    assert!(d.log_text().contains("did not answer kms:Decrypt"));
    assert_eq!(kms.count("Decrypt"), 2);
    assert_eq!(d.stop(), 0);
}

#[test]
fn answers_slower_than_the_deadline_fail_in_time() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &[]);
    kms.fault(json!({"op": "Decrypt", "kind": "delay", "delay": 30.0}));
    let started = Instant::now();
    let out = kms.nbdcrypt(&["serve", vol.image(), "--listen", "127.0.0.1:0", "--kms-timeout", "2s"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("did not answer kms:Decrypt"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn binding_to_a_volume_id_warns_or_refuses_on_another_device() {
    let mut kms = KmsFixture::start();
    let key = kms.create_key("us-east-1");
    let bound = "vol-0123456789abcdef0";
    let vol = KmsVolume::format(&kms, 8 * MIB, 4096, &format!("aws-kms:{key}"), &["--bind-volume-id", bound]);
    let h = inspect_json(&kms, &vol);
    assert_eq!(h["binding"], bound);
    assert_eq!(h["slots"][0]["context"]["nbdcrypt:binding"], bound);

    // The NVMe serial form of the same id matches.
    let d = serve(&kms, &vol, &kms.proxy_url(), &["--device-id", "vol0123456789abcdef0", "--strict-binding"]).unwrap();
    assert!(!d.log_text().contains("cloned"));
    assert_eq!(d.stop(), 0);

    let d = serve(&kms, &vol, &kms.proxy_url(), &["--device-id", "vol-0fffffffffffffff0"]).unwrap();
    assert!(d.log_text().contains("copied or cloned"), "{}", d.log_text());
    assert_eq!(d.stop(), 0);

    let decrypts = kms.count("Decrypt");
    let args = ["serve", vol.image(), "--listen", "127.0.0.1:0", "--strict-binding"];
    let out = kms.nbdcrypt(&[&args[..], &["--device-id", "vol-0fffffffffffffff0"]].concat());
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("bound to volume vol-0123456789abcdef0"), "{}", stderr(&out));
    // A file has no volume id: strict refuses that too.
    let out = kms.nbdcrypt(&args);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot be determined"), "{}", stderr(&out));
    // Both refused before KMS was asked.
    assert_eq!(kms.count("Decrypt"), decrypts);
}

#[test]
fn region_comes_from_the_key_arn_and_the_endpoint_flag_works() {
    let mut kms = KmsFixture::start();
    // The key lives in eu-west-1 while AWS_REGION says us-east-1; moto keeps regions apart.
    let key = kms.create_key("eu-west-1");
    kms.cmd(json!({"cmd": "create-alias", "name": "alias/nbdcrypt-test", "key": key}));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let image = image.to_str().unwrap();
    let alias_arn = key.replace(key.rsplit(':').next().unwrap(), "alias/nbdcrypt-test");
    let endpoint = kms.moto_url();
    let mut cmd = std::process::Command::new(bin());
    kms.configure(&mut cmd, None);
    let out = cmd
        .args(["format", image, "--key", &format!("aws-kms:{alias_arn}"), "--kms-endpoint", &endpoint])
        .output()
        .unwrap();
    check(out, "format with an alias ARN and --kms-endpoint");
    // The slot records the key ARN KMS answered with, not the alias.
    let mut cmd = std::process::Command::new(bin());
    kms.configure(&mut cmd, None);
    let out = check(cmd.args(["keyslot", "list", image, "--json"]).output().unwrap(), "keyslot list");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["slots"][0]["key_id"], key.as_str());
    let out = kms.nbdcrypt_at(&endpoint, &["inspect", image, "--dump-volume-key", "--yes"]);
    check(out, "unlock in eu-west-1");
}

#[test]
fn missing_region_or_credentials_are_clear_errors() {
    let kms = KmsFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let image = image.to_str().unwrap();

    let mut cmd = std::process::Command::new(bin());
    kms.configure(&mut cmd, Some(&kms.moto_url()));
    let out = cmd.env_remove("AWS_REGION").args(["format", image, "--key", "aws-kms:alias/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no AWS region"), "{}", stderr(&out));

    let mut cmd = std::process::Command::new(bin());
    kms.configure(&mut cmd, Some(&kms.moto_url()));
    cmd.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY");
    let out = cmd.args(["format", image, "--key", "aws-kms:alias/x", "--kms-timeout", "5s"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no AWS credentials found"), "{}", stderr(&out));
}
