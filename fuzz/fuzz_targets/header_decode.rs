//! Fuzzes `header::decode`: it must never panic, and whatever it accepts must re-encode and
//! decode to the same header.
//!
//! The first input byte picks the mode:
//! - bit 0: decode as the primary (0) or secondary (1) copy;
//! - bit 1: 0 = the rest is a raw copy area, as read from disk; 1 = the rest is JSON metadata,
//!   wrapped in a well-formed binary block with a correct checksum, so the fuzzer gets past
//!   SHA-256 to the JSON parser and the field validation;
//! - bit 2 (with bit 1): take the block's first 48 bytes from the input too (magic, version,
//!   reserved, length, seq, offset, uuid), to reach the later block checks.
//!
//! Seeds: `fuzz/seeds/header_decode/` (`cargo fuzz run header_decode corpus/header_decode
//! seeds/header_decode`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdcrypt::crypto::kdf::sha256;
use nbdcrypt::header::{decode, encode, CopyKind};

const BLOCK_LEN: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let which = if mode & 1 == 0 {
        CopyKind::Primary
    } else {
        CopyKind::Secondary
    };
    if mode & 2 == 0 {
        check(rest, which);
    } else {
        check(&sealed(rest, which, mode & 4 != 0), which);
    }
});

fn check(area: &[u8], which: CopyKind) {
    if let Ok(h) = decode(area, which) {
        let again = encode(&h, which).expect("a decoded header re-encodes");
        assert_eq!(
            decode(&again, which).expect("a re-encoded header decodes"),
            h
        );
    }
}

/// A copy area made of a correct binary block and `input` as the JSON (or, with `raw_block`,
/// the block's first 48 bytes taken from `input` and the JSON after them), with the checksum
/// computed as `docs/header-format.md` says.
fn sealed(input: &[u8], which: CopyKind, raw_block: bool) -> Vec<u8> {
    let mut block = [0u8; BLOCK_LEN];
    let json = if raw_block && input.len() >= 48 {
        block[..48].copy_from_slice(&input[..48]);
        &input[48..]
    } else {
        block[..8].copy_from_slice(match which {
            CopyKind::Primary => b"NBDCRYPT",
            CopyKind::Secondary => b"TPYRCDBN",
        });
        block[8..10].copy_from_slice(&1u16.to_be_bytes());
        block[12..16].copy_from_slice(&(input.len() as u32).to_be_bytes());
        block[16..24].copy_from_slice(&1u64.to_be_bytes());
        block[24..32].copy_from_slice(&which.offset().to_be_bytes());
        block[32..48].copy_from_slice(uuid_of(input).as_bytes());
        input
    };
    let mut area = Vec::with_capacity(BLOCK_LEN + json.len());
    area.extend_from_slice(&block);
    area.extend_from_slice(json);
    let sum = sha256(&area);
    area[48..80].copy_from_slice(&sum);
    area
}

/// The JSON's uuid, so the block agrees with it and the whole decode path is reachable.
fn uuid_of(json: &[u8]) -> uuid::Uuid {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("uuid")?.as_str()?.parse().ok())
        .unwrap_or_default()
}
