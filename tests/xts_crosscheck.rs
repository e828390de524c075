//! Cross-checks the sector cipher against an independent AES-XTS: Python `cryptography`
//! (`Cipher(algorithms.AES(key64), modes.XTS(tweak16))`, on OpenSSL). `openssl enc` cannot be
//! used: it refuses XTS.
//!
//! Needs a Python 3 with `cryptography`: `python3` on PATH, then `/usr/bin/python3` (CI installs
//! `python3-cryptography` with apt and `cryptography` with pip). Without one the test fails with
//! a message saying so; set `NBDCRYPT_SKIP_PY=1` to skip it deliberately.
//!
//! Key, tweak and data go to Python as hex over stdin (never on the command line, where `ps`
//! would show them), one `key tweak data` line per sector; it answers one hex line per sector.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use nbdcrypt::crypto::{SectorCipher, VolumeKey};
use nbdcrypt::units::{SectorIndex, SectorSize};

/// Encrypts each `key tweak plaintext` line of stdin and prints the ciphertext, all in hex.
const PY_XTS: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
for line in sys.stdin:
    k, t, d = line.split()
    e = Cipher(algorithms.AES(bytes.fromhex(k)), modes.XTS(bytes.fromhex(t))).encryptor()
    print((e.update(bytes.fromhex(d)) + e.finalize()).hex())
"#;

const INTERPRETERS: [&str; 2] = ["python3", "/usr/bin/python3"];

/// The first interpreter that can import `cryptography`'s cipher module.
fn find_python() -> Option<&'static str> {
    INTERPRETERS.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs `PY_XTS` over `input` and returns its stdout lines.
fn python_encrypt(py: &str, input: &str) -> Vec<String> {
    let mut child = Command::new(py)
        .args(["-c", PY_XTS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    // Python prints while it reads: writing all input before reading any output could fill
    // both pipes and deadlock, so write from a thread while collecting the output.
    let mut stdin = child.stdin.take().expect("python stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python output");
    writer.join().expect("writer thread").expect("write to python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").lines().map(str::to_owned).collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut v).expect("rng");
    v
}

#[test]
fn sectors_match_python_cryptography() {
    if std::env::var_os("NBDCRYPT_SKIP_PY").is_some_and(|v| v == "1") {
        eprintln!("NBDCRYPT_SKIP_PY=1: skipping the cross-check against Python cryptography");
        return;
    }
    let Some(py) = find_python() else {
        panic!(
            "no Python 3 with the `cryptography` package found (tried {INTERPRETERS:?}); install \
             python3-cryptography (apt) or `pip install cryptography`, or set NBDCRYPT_SKIP_PY=1 \
             to skip this cross-check"
        );
    };

    let firsts = [0u64, 1, 255, (1 << 32) + 17, (1 << 40) + 3, u64::MAX - 4];
    for size in [SectorSize::S512, SectorSize::S4096] {
        let ss = size.bytes_usize();
        let key = VolumeKey::generate().expect("key");
        let cipher = SectorCipher::new(&key, size).expect("cipher");
        let key_hex = hex::encode(key.expose());

        // Three consecutive sectors per starting index, encrypted in one call.
        let mut input = String::new();
        let mut ours = Vec::new();
        let mut plains = Vec::new();
        for &first in &firsts {
            let plain = random_bytes(3 * ss);
            let mut buf = plain.clone();
            cipher.encrypt(SectorIndex(first), &mut buf).expect("encrypt");
            for (i, (p, c)) in plain.chunks_exact(ss).zip(buf.chunks_exact(ss)).enumerate() {
                let index = SectorIndex(first + i as u64);
                input.push_str(&format!("{key_hex} {} {}\n", hex::encode(index.tweak()), hex::encode(p)));
                ours.push((index, c.to_vec()));
                plains.push(p.to_vec());
            }
        }

        let theirs = python_encrypt(py, &input);
        assert_eq!(theirs.len(), ours.len(), "one output line per sector");
        for (((index, c), t), p) in ours.iter().zip(&theirs).zip(&plains) {
            assert_eq!(&hex::encode(c), t, "sector {index:?}, sector size {size}");
            let mut back = hex::decode(t).expect("hex");
            cipher.decrypt(*index, &mut back).expect("decrypt");
            assert_eq!(&back, p, "decrypting Python's ciphertext, sector {index:?}, sector size {size}");
        }
    }
}
