//! The pure codec between a [`Header`] and one copy area: bytes in, typed values out, no I/O.
//!
//! Layout of a copy area (`docs/header-format.md` has the reasoning):
//!
//! ```text
//! off   len  field
//! 0     8    magic: "NBDCRYPT" (4e 42 44 43 52 59 50 54) in the primary copy,
//!            "TPYRCDBN" (54 50 59 52 43 44 42 4e) in the secondary copy
//! 8     2    format version, u16 big-endian, = 1
//! 10    2    reserved, 0
//! 12    4    JSON length, u32 BE, 2 <= len <= COPY_AREA - 4096
//! 16    8    sequence number, u64 BE (higher wins)
//! 24    8    offset of this copy on the volume, u64 BE (0 or COPY_AREA)
//! 32    16   volume uuid (equals the JSON's uuid)
//! 48    32   SHA-256 over the 4096-byte block with this field zeroed, then the JSON bytes
//! 80    4016 zero
//! 4096  len  JSON metadata (UTF-8), then zeros to the end of the area
//! ```
//!
//! [`decode`] checks in this order: magic, version (an unknown layout cannot be checksummed),
//! reserved, JSON length (bounded before the JSON is touched), checksum, placement, padding,
//! then parses and validates the JSON and matches the two uuids. It never panics and never
//! allocates more than the bounded JSON length.

use std::fmt;

use aws_lc_rs::digest;

use super::json::RawMetadata;
use super::{Header, HeaderError, COPY_AREA, FORMAT_VERSION};

/// Magic of the primary copy: `"NBDCRYPT"`.
pub const MAGIC_PRIMARY: [u8; 8] = [0x4e, 0x42, 0x44, 0x43, 0x52, 0x59, 0x50, 0x54];

/// Magic of the secondary copy: `"TPYRCDBN"` (the primary's reversed), so a copy can never be
/// mistaken for the other one.
pub const MAGIC_SECONDARY: [u8; 8] = [0x54, 0x50, 0x59, 0x52, 0x43, 0x44, 0x42, 0x4e];

/// Length of the binary block at the start of each copy area.
pub const BLOCK_LEN: usize = 4096;

/// [`COPY_AREA`] as a `usize`, for buffers.
pub const AREA_LEN: usize = 1 << 20;
const _: () = assert!(AREA_LEN as u64 == COPY_AREA);

/// Smallest JSON metadata length (`{}`).
pub const MIN_JSON_LEN: usize = 2;

/// Largest JSON metadata length: the rest of the copy area.
pub const MAX_JSON_LEN: usize = AREA_LEN - BLOCK_LEN;

const OFF_VERSION: usize = 8;
const OFF_RESERVED: usize = 10;
const OFF_JSON_LEN: usize = 12;
const OFF_SEQ: usize = 16;
const OFF_COPY_OFFSET: usize = 24;
/// Offset of the volume uuid in the binary block.
pub const OFF_UUID: usize = 32;
const OFF_CHECKSUM: usize = 48;
const CHECKSUM_LEN: usize = 32;
const OFF_PADDING: usize = OFF_CHECKSUM + CHECKSUM_LEN;

/// Which of the two copies of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyKind {
    /// At offset 0.
    Primary,
    /// At offset [`COPY_AREA`].
    Secondary,
}

impl CopyKind {
    /// Both copies, primary first.
    pub const ALL: [CopyKind; 2] = [CopyKind::Primary, CopyKind::Secondary];

    /// Raw-volume byte offset of this copy's area.
    pub fn offset(self) -> u64 {
        match self {
            CopyKind::Primary => 0,
            CopyKind::Secondary => COPY_AREA,
        }
    }

    /// The magic this copy starts with.
    pub fn magic(self) -> [u8; 8] {
        match self {
            CopyKind::Primary => MAGIC_PRIMARY,
            CopyKind::Secondary => MAGIC_SECONDARY,
        }
    }

    /// The other copy.
    pub fn other(self) -> CopyKind {
        match self {
            CopyKind::Primary => CopyKind::Secondary,
            CopyKind::Secondary => CopyKind::Primary,
        }
    }
}

impl fmt::Display for CopyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyKind::Primary => "primary",
            CopyKind::Secondary => "secondary",
        })
    }
}

/// True if `bytes` starts with either magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC_PRIMARY) || bytes.starts_with(&MAGIC_SECONDARY)
}

/// Encodes `h` as the full area of copy `which`: exactly [`COPY_AREA`] bytes. Validates `h`
/// first; `h.seq` is written as is.
pub fn encode(h: &Header, which: CopyKind) -> Result<Vec<u8>, HeaderError> {
    h.validate()?;
    let json = serde_json::to_vec(&RawMetadata::from_header(h))
        .map_err(|source| HeaderError::Metadata { copy: which, source })?;
    if json.len() > MAX_JSON_LEN {
        return Err(HeaderError::MetadataTooLarge { len: json.len(), max: MAX_JSON_LEN });
    }
    // Bounded just above by MAX_JSON_LEN < u32::MAX.
    let json_len =
        u32::try_from(json.len()).map_err(|_| HeaderError::MetadataTooLarge { len: json.len(), max: MAX_JSON_LEN })?;

    let mut block = [0u8; BLOCK_LEN];
    put(&mut block, 0, &which.magic());
    put(&mut block, OFF_VERSION, &h.version.to_be_bytes());
    put(&mut block, OFF_JSON_LEN, &json_len.to_be_bytes());
    put(&mut block, OFF_SEQ, &h.seq.to_be_bytes());
    put(&mut block, OFF_COPY_OFFSET, &which.offset().to_be_bytes());
    put(&mut block, OFF_UUID, h.uuid.as_bytes());
    let sum = checksum(&block, &json);
    put(&mut block, OFF_CHECKSUM, &sum);

    let mut area = vec![0u8; AREA_LEN];
    area[..BLOCK_LEN].copy_from_slice(&block);
    // BLOCK_LEN + json.len() <= AREA_LEN, checked above.
    area[BLOCK_LEN..BLOCK_LEN + json.len()].copy_from_slice(&json);
    Ok(area)
}

/// Decodes the area of copy `which` (as read from its offset). Accepts any bytes: at least the
/// binary block and the JSON it announces must be present; what follows is ignored. Does not
/// check the MAC (that needs the key: [`Header::verify_mac`]).
pub fn decode(area: &[u8], which: CopyKind) -> Result<Header, HeaderError> {
    let corrupt = |reason: String| HeaderError::Corrupt { copy: which, reason };
    let block: &[u8; BLOCK_LEN] = area
        .get(..BLOCK_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt(format!("only {} bytes, shorter than the binary block", area.len())))?;

    let magic: [u8; 8] = get(block, 0);
    if magic != which.magic() {
        return Err(corrupt(if magic == which.other().magic() {
            format!("it carries the {} copy's magic", which.other())
        } else {
            "no nbdcrypt magic".to_owned()
        }));
    }
    let version = u16::from_be_bytes(get(block, OFF_VERSION));
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let reserved = u16::from_be_bytes(get(block, OFF_RESERVED));
    if reserved != 0 {
        return Err(corrupt(format!("reserved field is {reserved:#06x}, not 0")));
    }
    let json_len = u32::from_be_bytes(get(block, OFF_JSON_LEN));
    let json_len = usize::try_from(json_len)
        .ok()
        .filter(|l| (MIN_JSON_LEN..=MAX_JSON_LEN).contains(l))
        .ok_or_else(|| corrupt(format!("JSON length {json_len} is outside {MIN_JSON_LEN}..={MAX_JSON_LEN}")))?;
    let json = BLOCK_LEN
        .checked_add(json_len)
        .and_then(|end| area.get(BLOCK_LEN..end))
        .ok_or_else(|| corrupt(format!("JSON length {json_len} runs past the {} bytes read", area.len())))?;
    let stored: [u8; CHECKSUM_LEN] = get(block, OFF_CHECKSUM);
    if checksum(block, json) != stored {
        return Err(corrupt("checksum mismatch".to_owned()));
    }

    let copy_offset = u64::from_be_bytes(get(block, OFF_COPY_OFFSET));
    if copy_offset != which.offset() {
        return Err(corrupt(format!("it was written for offset {copy_offset} but read at {}", which.offset())));
    }
    if block[OFF_PADDING..].iter().any(|&b| b != 0) {
        return Err(corrupt("padding of the binary block is not zero".to_owned()));
    }
    let seq = u64::from_be_bytes(get(block, OFF_SEQ));
    let uuid = uuid::Uuid::from_bytes(get(block, OFF_UUID));

    let text = std::str::from_utf8(json).map_err(|e| corrupt(format!("JSON metadata is not UTF-8: {e}")))?;
    let raw: RawMetadata =
        serde_json::from_str(text).map_err(|source| HeaderError::Metadata { copy: which, source })?;
    let h = raw.into_header(seq)?;
    if h.uuid != uuid {
        return Err(corrupt(format!("binary block uuid {uuid} differs from the metadata's {}", h.uuid)));
    }
    Ok(h)
}

/// SHA-256 over `block` with the checksum field taken as zero, then `json`.
fn checksum(block: &[u8; BLOCK_LEN], json: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&block[..OFF_CHECKSUM]);
    ctx.update(&[0u8; CHECKSUM_LEN]);
    ctx.update(&block[OFF_PADDING..]);
    ctx.update(json);
    let d = ctx.finish();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// `N` bytes of the block at `off`. Only called with the layout constants above, all of which
/// end within the block, so the slice cannot be out of range.
fn get<const N: usize>(block: &[u8; BLOCK_LEN], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&block[off..off + N]);
    out
}

/// Writes `bytes` into the block at `off`; same invariant as [`get`].
fn put(block: &mut [u8; BLOCK_LEN], off: usize, bytes: &[u8]) {
    block[off..off + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::header::tests::{key, sample};
    use crate::header::{Binding, Checkpoint, Cipher, KeyDigest, KeySlot, DEFAULT_DATA_OFFSET, MAX_SLOTS};
    use crate::units::SectorSize;

    fn sample_seq(seq: u64) -> Header {
        let mut h = sample(&key(1));
        h.seq = seq;
        h
    }

    /// Replaces the JSON of an encoded area and recomputes its checksum, to get past the
    /// checksum to the checks behind it.
    fn with_json(area: &[u8], json: &[u8]) -> Vec<u8> {
        let mut block: [u8; BLOCK_LEN] = area[..BLOCK_LEN].try_into().unwrap();
        put(&mut block, OFF_JSON_LEN, &(json.len() as u32).to_be_bytes());
        resealed(block, json)
    }

    /// An area from `block` and `json` with a correct checksum.
    fn resealed(mut block: [u8; BLOCK_LEN], json: &[u8]) -> Vec<u8> {
        let sum = checksum(&block, json);
        put(&mut block, OFF_CHECKSUM, &sum);
        let mut out = vec![0u8; AREA_LEN];
        out[..BLOCK_LEN].copy_from_slice(&block);
        out[BLOCK_LEN..BLOCK_LEN + json.len()].copy_from_slice(json);
        out
    }

    fn json_of(area: &[u8]) -> serde_json::Value {
        let len = u32::from_be_bytes(get(area[..BLOCK_LEN].try_into().unwrap(), OFF_JSON_LEN));
        serde_json::from_slice(&area[BLOCK_LEN..BLOCK_LEN + len as usize]).unwrap()
    }

    fn block_of(area: &[u8]) -> [u8; BLOCK_LEN] {
        area[..BLOCK_LEN].try_into().unwrap()
    }

    #[test]
    fn round_trips_both_copies() {
        let h = sample_seq(7);
        for which in CopyKind::ALL {
            let area = encode(&h, which).unwrap();
            assert_eq!(area.len() as u64, COPY_AREA);
            assert_eq!(decode(&area, which).unwrap(), h);
        }
    }

    #[test]
    fn magics_are_the_documented_strings() {
        assert_eq!(&MAGIC_PRIMARY, b"NBDCRYPT");
        assert_eq!(&MAGIC_SECONDARY, b"TPYRCDBN");
        assert!(has_magic(&encode(&sample_seq(1), CopyKind::Secondary).unwrap()));
        assert!(!has_magic(&[0u8; 16]));
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let area = encode(&sample_seq(3), CopyKind::Primary).unwrap();
        let json_len = u32::from_be_bytes(get(&block_of(&area), OFF_JSON_LEN)) as usize;
        let mut copy = area.clone();
        for pos in 0..BLOCK_LEN + json_len {
            for mask in [0x01u8, 0x80, 0xFF] {
                copy[pos] ^= mask;
                assert!(decode(&copy, CopyKind::Primary).is_err(), "flip {mask:#x} at {pos} went unnoticed");
                copy[pos] ^= mask;
            }
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        area[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(decode(&area, CopyKind::Primary), Err(HeaderError::UnsupportedVersion(2))));
    }

    #[test]
    fn unknown_cipher_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        let mut v = json_of(&area);
        v["cipher"] = "serpent-xts-plain64".into();
        let area = with_json(&area, &serde_json::to_vec(&v).unwrap());
        assert!(matches!(
            decode(&area, CopyKind::Primary),
            Err(HeaderError::UnsupportedCipher(c)) if c == "serpent-xts-plain64"
        ));
    }

    #[test]
    fn unknown_json_field_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        let mut v = json_of(&area);
        v["surprise"] = true.into();
        let area = with_json(&area, &serde_json::to_vec(&v).unwrap());
        assert!(matches!(decode(&area, CopyKind::Primary), Err(HeaderError::Metadata { .. })));
    }

    #[test]
    fn missing_json_field_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        let mut v = json_of(&area);
        v.as_object_mut().unwrap().remove("data_size");
        let area = with_json(&area, &serde_json::to_vec(&v).unwrap());
        assert!(matches!(decode(&area, CopyKind::Primary), Err(HeaderError::Metadata { .. })));
    }

    #[test]
    fn json_length_over_bound_is_refused_before_reading() {
        // Only the binary block is passed: the bound must be checked before the JSON is
        // looked at (or allocated for).
        let mut block = block_of(&encode(&sample_seq(1), CopyKind::Primary).unwrap());
        put(&mut block, OFF_JSON_LEN, &u32::MAX.to_be_bytes());
        let err = decode(&block, CopyKind::Primary).unwrap_err();
        assert!(matches!(&err, HeaderError::Corrupt { reason, .. } if reason.contains("outside")), "{err}");
        put(&mut block, OFF_JSON_LEN, &((MAX_JSON_LEN + 1) as u32).to_be_bytes());
        assert!(decode(&block, CopyKind::Primary).is_err());
    }

    #[test]
    fn json_length_under_bound_is_refused() {
        let mut block = block_of(&encode(&sample_seq(1), CopyKind::Primary).unwrap());
        put(&mut block, OFF_JSON_LEN, &1u32.to_be_bytes());
        let err = decode(&resealed(block, b"{"), CopyKind::Primary).unwrap_err();
        assert!(matches!(&err, HeaderError::Corrupt { reason, .. } if reason.contains("outside")), "{err}");
    }

    #[test]
    fn truncated_area_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        assert!(decode(&area[..BLOCK_LEN + 10], CopyKind::Primary).is_err());
        assert!(decode(&area[..100], CopyKind::Primary).is_err());
        assert!(decode(&[], CopyKind::Primary).is_err());
    }

    #[test]
    fn copy_read_as_the_other_copy_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        let err = decode(&area, CopyKind::Secondary).unwrap_err();
        assert!(matches!(err, HeaderError::Corrupt { copy: CopyKind::Secondary, .. }));
    }

    #[test]
    fn copy_read_at_the_wrong_offset_is_refused() {
        // A secondary copy claiming offset 0, with a valid checksum.
        let area = encode(&sample_seq(1), CopyKind::Secondary).unwrap();
        let mut block = block_of(&area);
        put(&mut block, OFF_COPY_OFFSET, &0u64.to_be_bytes());
        let json_len = u32::from_be_bytes(get(&block, OFF_JSON_LEN)) as usize;
        let area = resealed(block, &area[BLOCK_LEN..BLOCK_LEN + json_len]);
        let err = decode(&area, CopyKind::Secondary).unwrap_err();
        assert!(matches!(&err, HeaderError::Corrupt { reason, .. } if reason.contains("offset")), "{err}");
    }

    #[test]
    fn nonzero_reserved_is_refused() {
        let mut area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        area[OFF_RESERVED + 1] = 1;
        assert!(matches!(decode(&area, CopyKind::Primary), Err(HeaderError::Corrupt { .. })));
    }

    #[test]
    fn uuid_mismatch_between_block_and_json_is_refused() {
        let area = encode(&sample_seq(1), CopyKind::Primary).unwrap();
        let mut block = block_of(&area);
        put(&mut block, OFF_UUID, &[0x22; 16]);
        let json_len = u32::from_be_bytes(get(&block, OFF_JSON_LEN)) as usize;
        let area = resealed(block, &area[BLOCK_LEN..BLOCK_LEN + json_len]);
        let err = decode(&area, CopyKind::Primary).unwrap_err();
        assert!(matches!(&err, HeaderError::Corrupt { reason, .. } if reason.contains("uuid")), "{err}");
    }

    #[test]
    fn invalid_header_is_not_encoded() {
        let mut h = sample_seq(1);
        h.data_size = 0;
        assert!(matches!(encode(&h, CopyKind::Primary), Err(HeaderError::Field { .. })));
    }

    #[test]
    fn oversized_metadata_is_refused_on_encode() {
        // 32 slots whose every string is made of control characters, which JSON escapes six
        // times over: well within each field's bound, too big in total.
        let mut h = sample_seq(1);
        let ctl = "\u{1}".repeat(2048);
        let context: BTreeMap<String, String> = (0..16).map(|i| (format!("{i:0>256}"), "\u{1}".repeat(256))).collect();
        h.slots = (0..MAX_SLOTS as u32)
            .map(|id| KeySlot {
                id,
                provider: ctl.clone(),
                key_id: ctl.clone(),
                wrapped: vec![0; 8192],
                context: context.clone(),
                created: 0,
            })
            .collect();
        assert!(matches!(encode(&h, CopyKind::Primary), Err(HeaderError::MetadataTooLarge { .. })));
    }

    fn short_string(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 1..8)
            .prop_map(move |cs| cs.into_iter().collect::<String>())
            .prop_filter("within bound", move |s| s.len() <= max)
    }

    fn small_map() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(short_string(256), ".{0,8}", 0..4)
    }

    fn arb_slot() -> impl Strategy<Value = KeySlot> {
        (short_string(2048), ".{0,16}", proptest::collection::vec(any::<u8>(), 1..64), small_map(), any::<u64>())
            .prop_map(|(provider, key_id, wrapped, context, created)| KeySlot {
                id: 0,
                provider,
                key_id,
                wrapped,
                context,
                created,
            })
    }

    prop_compose! {
        fn arb_header()(
            seq in any::<u64>(),
            uuid in any::<[u8; 16]>(),
            big in any::<bool>(),
            offset_blocks in 0u64..1 << 20,
            size_sectors in 1u64..1 << 40,
            salt in any::<[u8; 32]>(),
            value in any::<[u8; 32]>(),
            mac in any::<[u8; 32]>(),
            binding in proptest::option::of(short_string(256)),
            slots in proptest::collection::vec(arb_slot(), 0..4),
            checkpoint in proptest::option::of((short_string(256), any::<u64>(), small_map())),
            zero_sectors in any::<bool>(),
        ) -> Header {
            let sector_size = if big { SectorSize::S4096 } else { SectorSize::S512 };
            let data_size = size_sectors * sector_size.bytes_u64();
            Header {
                version: FORMAT_VERSION,
                seq,
                uuid: Uuid::from_bytes(uuid),
                cipher: Cipher::AesXtsPlain64,
                sector_size,
                data_offset: DEFAULT_DATA_OFFSET + offset_blocks * 4096,
                data_size,
                key_digest: KeyDigest { salt, value },
                mac,
                binding: binding.map(|volume_id| Binding { volume_id }),
                slots: slots.into_iter().enumerate().map(|(i, s)| KeySlot { id: i as u32 * 3, ..s }).collect(),
                checkpoint: checkpoint.map(|(kind, off, extra)| Checkpoint { kind, offset: off % (data_size + 1), extra }),
                zero_sectors,
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = decode(&bytes, CopyKind::Primary);
            let _ = decode(&bytes, CopyKind::Secondary);
        }

        #[test]
        fn decode_never_panics_on_a_mutated_header(
            edits in proptest::collection::vec((0usize..BLOCK_LEN + 1024, any::<u8>()), 1..8),
            reseal in any::<bool>(),
        ) {
            let area = encode(&sample_seq(5), CopyKind::Primary).unwrap();
            let mut bytes = area[..BLOCK_LEN + 1024].to_vec();
            for (pos, b) in edits {
                bytes[pos] = b;
            }
            if reseal {
                // Recompute the checksum so the mutation reaches the later checks.
                let block: [u8; BLOCK_LEN] = bytes[..BLOCK_LEN].try_into().unwrap();
                let len = (u32::from_be_bytes(get(&block, OFF_JSON_LEN)) as usize).min(1024);
                bytes = resealed(block, &bytes[BLOCK_LEN..BLOCK_LEN + len]);
            }
            let _ = decode(&bytes, CopyKind::Primary);
        }

        #[test]
        fn valid_headers_round_trip(h in arb_header(), secondary in any::<bool>()) {
            let which = if secondary { CopyKind::Secondary } else { CopyKind::Primary };
            let area = encode(&h, which).unwrap();
            prop_assert_eq!(decode(&area, which).unwrap(), h);
        }
    }
}
