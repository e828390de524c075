//! The on-disk header: what a volume is (uuid, cipher, sector size, where the data area lies),
//! the key slots that hold the volume key wrapped by a key provider, and the proofs that bind
//! it all to the volume key (a key digest and a MAC).
//!
//! The format is specified in `docs/header-format.md`; it follows LUKS2's shape (a small
//! binary block with magic, version, sequence number and checksum, followed by a JSON metadata
//! area, stored twice) without LUKS2's keyslot/segment/digest indirection.
//!
//! - this module: the validated [`Header`] type, its key digest and MAC, and [`HeaderError`].
//! - [`disk`]: the pure codec between a `Header` and one 1 MiB copy area (no I/O).
//! - `json`: the raw serde structs of the JSON metadata, kept apart from `Header` so that
//!   nothing unvalidated ever reaches the rest of the crate.
//! - [`store`]: reading and writing the two copies on a [`crate::backend::Backend`]: picking
//!   the newer valid copy, crash-safe updates, repair.
//!
//! Trust: the checksum in each copy detects corruption but not tampering (anyone can recompute
//! a SHA-256). What the data path trusts (geometry, cipher, binding) is also covered by a MAC
//! keyed from the volume key, checked by [`Header::verify_mac`] once the key is unwrapped. Key
//! slots are deliberately outside the MAC: a KMS re-encrypt changes them without the plaintext
//! key, and a tampered slot can only fail to unwrap or unwrap a key that [`Header::key_matches`]
//! rejects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use uuid::Uuid;

use crate::crypto::kdf::{derive, mac, mac_eq, LABEL_HEADER_MAC, LABEL_KEY_DIGEST};
use crate::crypto::secret::VolumeKey;
use crate::units::SectorSize;

pub mod disk;
mod json;
pub mod store;

pub use disk::{decode, encode, has_magic, CopyKind};
pub use store::{load, probe, update, write_new, CopyState, Loaded};

/// Size of one header copy area: a 4096-byte binary block then the JSON metadata area.
pub const COPY_AREA: u64 = 1 << 20;

/// Where the data area starts on a freshly formatted volume: right after the two copy areas.
pub const DEFAULT_DATA_OFFSET: u64 = 2 * COPY_AREA;

/// The most key slots a header holds (ids `0..MAX_SLOTS`), as in LUKS2.
pub const MAX_SLOTS: usize = 32;

/// The only format version this code reads or writes.
pub const FORMAT_VERSION: u16 = 1;

/// Upper bound of a slot's `provider` and `key_id` strings, in bytes.
pub const MAX_SLOT_STRING: usize = 2048;

/// Upper bound of a slot's wrapped key, in bytes (a KMS ciphertext blob is far smaller).
pub const MAX_WRAPPED: usize = 8192;

/// Upper bound of the number of entries of a slot context or a checkpoint's `extra` map.
pub const MAX_MAP_ENTRIES: usize = 16;

/// Upper bound of each key and value of those maps, of a checkpoint kind and of a binding's
/// volume id, in bytes.
pub const MAX_SHORT_STRING: usize = 256;

/// The sector cipher of a volume. Only one is supported; anything else in a header is refused
/// by name, never guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// AES-256 in XTS mode, tweak = little-endian 64-bit sector index (dm-crypt's
    /// `aes-xts-plain64`), with a 64-byte key (two 256-bit halves).
    AesXtsPlain64,
}

impl Cipher {
    /// The name used in the JSON metadata and in the MAC's canonical bytes.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::AesXtsPlain64 => "aes-xts-plain64",
        }
    }

    /// The key length this cipher takes, in bytes.
    pub fn key_bytes(self) -> u32 {
        match self {
            Cipher::AesXtsPlain64 => 64,
        }
    }

    /// The cipher of that name, if supported.
    pub fn from_name(name: &str) -> Option<Cipher> {
        match name {
            "aes-xts-plain64" => Some(Cipher::AesXtsPlain64),
            _ => None,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A check value that tells whether a candidate volume key is the volume's key, without
/// revealing anything usable about it: `value = HMAC-SHA256(HKDF(key, salt, LABEL_KEY_DIGEST),
/// uuid)`. The only algorithm is `hkdf-hmac-sha256`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDigest {
    pub salt: [u8; 32],
    pub value: [u8; 32],
}

impl KeyDigest {
    /// The algorithm name stored in the JSON metadata.
    pub const ALG: &'static str = "hkdf-hmac-sha256";

    /// The digest of `key` for volume `uuid` with `salt`.
    pub fn compute(key: &VolumeKey, uuid: &Uuid, salt: [u8; 32]) -> KeyDigest {
        let subkey = derive(key, &salt, LABEL_KEY_DIGEST);
        let value = mac(&subkey, &[uuid.as_bytes()]);
        KeyDigest { salt, value }
    }
}

/// One key slot: the volume key wrapped by a key provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Slot number, unique in the header, below [`MAX_SLOTS`].
    pub id: u32,
    /// Which provider wrapped it (`local`, `aws-kms`, …); at most [`MAX_SLOT_STRING`] bytes.
    pub provider: String,
    /// The provider's key identifier (a KEK file id, a KMS key ARN); at most
    /// [`MAX_SLOT_STRING`] bytes.
    pub key_id: String,
    /// The wrapped key as the provider returned it; 1 to [`MAX_WRAPPED`] bytes.
    pub wrapped: Vec<u8>,
    /// The encryption context the key was wrapped under; at most [`MAX_MAP_ENTRIES`] entries,
    /// each key and value at most [`MAX_SHORT_STRING`] bytes.
    pub context: BTreeMap<String, String>,
    /// When the slot was created, in seconds since the Unix epoch.
    pub created: u64,
}

/// Binds a header to one cloud volume, so the header cannot be replayed onto another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The cloud volume id (`vol-…`); 1 to [`MAX_SHORT_STRING`] bytes.
    pub volume_id: String,
}

/// Progress of a long-running data-area operation (re-encryption), so it can resume after a
/// crash. Stored as `reencrypt` in the JSON; outside the MAC, like the sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// What is in progress; 1 to [`MAX_SHORT_STRING`] bytes.
    pub kind: String,
    /// How far it got, a byte offset in the data area, at most `data_size`.
    pub offset: u64,
    /// Operation-specific values, bounded like a slot context.
    pub extra: BTreeMap<String, String>,
}

/// A validated header. Holds no secret (wrapped keys are ciphertext), so it is `Clone` and
/// `Debug`. Every value of this type that came from [`disk::decode`] or [`Header::new`] satisfies
/// [`Header::validate`]; the MAC is only checked by [`Header::verify_mac`], with the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version; always [`FORMAT_VERSION`].
    pub version: u16,
    /// Sequence number of the copy it was read from; the store sets it on every write.
    pub seq: u64,
    pub uuid: Uuid,
    pub cipher: Cipher,
    pub sector_size: SectorSize,
    /// Raw-volume byte offset of the data area: at least [`DEFAULT_DATA_OFFSET`], a multiple of
    /// 4096.
    pub data_offset: u64,
    /// Length of the data area in bytes: non-zero, a multiple of the sector size.
    pub data_size: u64,
    pub key_digest: KeyDigest,
    /// HMAC-SHA256 over [`Header::canonical_bytes`]; see [`Header::verify_mac`].
    pub mac: [u8; 32],
    pub binding: Option<Binding>,
    pub slots: Vec<KeySlot>,
    pub checkpoint: Option<Checkpoint>,
    /// An all-zero raw sector reads as plaintext zeros instead of being decrypted (set by
    /// `migrate`, whose target stays sparse where the source is zero). Real ciphertext is
    /// all-zero with probability 2^-4096 (2^-32768 for 4096-byte sectors). Covered by the MAC.
    pub zero_sectors: bool,
}

impl Header {
    /// A header for a fresh volume: digest with a random salt, MAC computed, `seq = 0` (the
    /// store sets it when writing), no slots yet.
    pub fn new(
        uuid: Uuid,
        sector_size: SectorSize,
        data_offset: u64,
        data_size: u64,
        binding: Option<Binding>,
        key: &VolumeKey,
    ) -> Result<Header, HeaderError> {
        use aws_lc_rs::rand::{SecureRandom, SystemRandom};
        let mut salt = [0u8; 32];
        SystemRandom::new().fill(&mut salt).map_err(|_| HeaderError::Random)?;
        let mut h = Header {
            version: FORMAT_VERSION,
            seq: 0,
            uuid,
            cipher: Cipher::AesXtsPlain64,
            sector_size,
            data_offset,
            data_size,
            key_digest: KeyDigest::compute(key, &uuid, salt),
            mac: [0; 32],
            binding,
            slots: Vec::new(),
            checkpoint: None,
            zero_sectors: false,
        };
        h.validate()?;
        h.reseal(key);
        Ok(h)
    }

    /// True if `key` is this volume's key (key digest check, constant time).
    pub fn key_matches(&self, key: &VolumeKey) -> bool {
        let candidate = KeyDigest::compute(key, &self.uuid, self.key_digest.salt);
        mac_eq(&candidate.value, &self.key_digest.value)
    }

    /// [`Header::key_matches`] as a `Result`, for `?`.
    pub fn check_key(&self, key: &VolumeKey) -> Result<(), HeaderError> {
        if self.key_matches(key) {
            Ok(())
        } else {
            Err(HeaderError::KeyMismatch)
        }
    }

    /// Checks the MAC over the trusted fields with `key` (constant time). Check
    /// [`Header::key_matches`] first to tell "wrong key" from "tampered header".
    pub fn verify_mac(&self, key: &VolumeKey) -> Result<(), HeaderError> {
        if mac_eq(&self.compute_mac(key), &self.mac) {
            Ok(())
        } else {
            Err(HeaderError::MacMismatch)
        }
    }

    /// Recomputes the MAC after a change to a trusted field (only possible with the key).
    pub fn reseal(&mut self, key: &VolumeKey) {
        self.mac = self.compute_mac(key);
    }

    /// The lowest slot id not in use, or `None` when all [`MAX_SLOTS`] are taken.
    pub fn next_slot_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.slots.iter().map(|s| s.id).collect();
        (0..MAX_SLOTS as u32).find(|id| !used.contains(id))
    }

    /// The key slot with this id.
    pub fn slot(&self, id: u32) -> Option<&KeySlot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// One past the last byte of the data area on the raw volume. Cannot fail on a validated
    /// header; `None` on overflow otherwise.
    pub fn data_end(&self) -> Option<u64> {
        self.data_offset.checked_add(self.data_size)
    }

    fn compute_mac(&self, key: &VolumeKey) -> [u8; 32] {
        let subkey = derive(key, self.uuid.as_bytes(), LABEL_HEADER_MAC);
        mac(&subkey, &[&self.canonical_bytes()])
    }

    /// The fixed binary encoding of every field the data path trusts, which the MAC covers
    /// (all integers big-endian; variable-length fields length-prefixed so the encoding is
    /// injective):
    ///
    /// ```text
    /// u16 version | 16 uuid | u8 len, cipher name | u32 key_bytes | u32 sector_size
    /// | u64 data_offset | u64 data_size | u8 0 (no binding) or u8 1, u32 len, volume_id
    /// | u8 1 if zero_sectors (nothing otherwise, so older headers keep their MAC)
    /// ```
    ///
    /// Not covered: `seq` (changes on every write), the key digest (self-verifying), the
    /// slots (a KMS re-encrypt rewrites them without the plaintext key) and the checkpoint.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let name = self.cipher.name().as_bytes();
        let mut out = Vec::with_capacity(64 + MAX_SHORT_STRING);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(self.uuid.as_bytes());
        // Cipher names are short constants (checked by a test), so the cast cannot truncate.
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.cipher.key_bytes().to_be_bytes());
        out.extend_from_slice(&self.sector_size.bytes().to_be_bytes());
        out.extend_from_slice(&self.data_offset.to_be_bytes());
        out.extend_from_slice(&self.data_size.to_be_bytes());
        match &self.binding {
            None => out.push(0),
            Some(b) => {
                out.push(1);
                // `validate` bounds the id to MAX_SHORT_STRING bytes, so this never saturates.
                let len = u32::try_from(b.volume_id.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(b.volume_id.as_bytes());
            }
        }
        if self.zero_sectors {
            out.push(1);
        }
        out
    }

    /// Checks every bound of the format (see `docs/header-format.md`), naming the first field
    /// that violates one. Run by [`disk::encode`] and [`disk::decode`].
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(self.version));
        }
        let sector = self.sector_size.bytes_u64();
        if self.data_offset < DEFAULT_DATA_OFFSET {
            return Err(field(
                "data_offset",
                format!("{} is inside the header areas (minimum {DEFAULT_DATA_OFFSET})", self.data_offset),
            ));
        }
        if !self.data_offset.is_multiple_of(4096) || !self.sector_size.is_aligned(self.data_offset) {
            return Err(field("data_offset", format!("{} is not a multiple of 4096", self.data_offset)));
        }
        if self.data_size == 0 {
            return Err(field("data_size", "is zero".into()));
        }
        if !self.sector_size.is_aligned(self.data_size) {
            return Err(field(
                "data_size",
                format!("{} is not a multiple of the sector size {sector}", self.data_size),
            ));
        }
        if self.data_end().is_none() {
            return Err(field(
                "data_size",
                format!("data_offset {} + data_size {} overflows", self.data_offset, self.data_size),
            ));
        }
        if let Some(b) = &self.binding {
            check_len("binding.volume_id", &b.volume_id, 1, MAX_SHORT_STRING)?;
        }
        self.validate_slots()?;
        if let Some(c) = &self.checkpoint {
            check_len("reencrypt.kind", &c.kind, 1, MAX_SHORT_STRING)?;
            if c.offset > self.data_size {
                return Err(field(
                    "reencrypt.offset",
                    format!("{} is past the end of the data area ({})", c.offset, self.data_size),
                ));
            }
            check_map("reencrypt.extra", &c.extra)?;
        }
        Ok(())
    }

    fn validate_slots(&self) -> Result<(), HeaderError> {
        if self.slots.len() > MAX_SLOTS {
            return Err(field("slots", format!("{} slots, at most {MAX_SLOTS} allowed", self.slots.len())));
        }
        let mut seen = BTreeSet::new();
        for (i, s) in self.slots.iter().enumerate() {
            let name = |f: &str| format!("slots[{i}].{f}");
            if s.id as usize >= MAX_SLOTS {
                return Err(field(&name("id"), format!("{} is not below {MAX_SLOTS}", s.id)));
            }
            if !seen.insert(s.id) {
                return Err(field(&name("id"), format!("{} is used by another slot", s.id)));
            }
            check_len(&name("provider"), &s.provider, 1, MAX_SLOT_STRING)?;
            check_len(&name("key_id"), &s.key_id, 0, MAX_SLOT_STRING)?;
            if s.wrapped.is_empty() || s.wrapped.len() > MAX_WRAPPED {
                return Err(field(&name("wrapped"), format!("{} bytes, must be 1 to {MAX_WRAPPED}", s.wrapped.len())));
            }
            check_map(&name("context"), &s.context)?;
        }
        Ok(())
    }
}

fn field(name: &str, reason: String) -> HeaderError {
    HeaderError::Field { field: name.to_owned(), reason }
}

fn check_len(name: &str, s: &str, min: usize, max: usize) -> Result<(), HeaderError> {
    if s.len() < min || s.len() > max {
        return Err(field(name, format!("{} bytes, must be {min} to {max}", s.len())));
    }
    Ok(())
}

fn check_map(name: &str, m: &BTreeMap<String, String>) -> Result<(), HeaderError> {
    if m.len() > MAX_MAP_ENTRIES {
        return Err(field(name, format!("{} entries, at most {MAX_MAP_ENTRIES} allowed", m.len())));
    }
    for (k, v) in m {
        check_len(&format!("{name} key"), k, 1, MAX_SHORT_STRING)?;
        check_len(&format!("{name}[{k:?}]"), v, 0, MAX_SHORT_STRING)?;
    }
    Ok(())
}

/// Everything that can go wrong reading, checking or writing a header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Neither copy area starts with an nbdcrypt magic: not a formatted volume.
    #[error("no nbdcrypt header on this volume")]
    NotFound,

    /// One copy is unreadable as a header: bad magic, checksum, layout or placement.
    #[error("the {copy} header copy is corrupt: {reason}")]
    Corrupt { copy: CopyKind, reason: String },

    /// The JSON metadata of one copy passed the checksum but is not valid metadata (syntax,
    /// a missing field, an unknown field, a wrong type).
    #[error("the JSON metadata of the {copy} header copy is malformed")]
    Metadata {
        copy: CopyKind,
        #[source]
        source: serde_json::Error,
    },

    /// The header was written by a format version this build does not know.
    #[error("header format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u16),

    /// The header names a cipher this build does not implement.
    #[error("cipher {0:?} is not supported (only aes-xts-plain64)")]
    UnsupportedCipher(String),

    /// A metadata field is out of its bounds or inconsistent.
    #[error("header field {field} is invalid: {reason}")]
    Field { field: String, reason: String },

    /// The encoded JSON metadata does not fit in a copy area.
    #[error("header metadata is {len} bytes, more than the {max} that fit in a copy area")]
    MetadataTooLarge { len: usize, max: usize },

    /// The MAC over the trusted fields does not verify under the volume key.
    #[error("header was tampered with or belongs to another key (MAC mismatch)")]
    MacMismatch,

    /// A candidate volume key fails the key digest.
    #[error("key does not match this volume")]
    KeyMismatch,

    /// Neither copy holds a valid header, although at least one has a magic.
    #[error("both header copies are damaged (primary: {primary}; secondary: {secondary})")]
    BothCopiesDamaged { primary: String, secondary: String },

    /// The raw volume cannot hold the header areas plus the data area the header describes.
    #[error("the volume is {size} bytes but the header needs {needed}")]
    VolumeTooSmall { size: u64, needed: u64 },

    /// An update was asked to change what identifies the volume.
    #[error("a header update cannot change the volume uuid (from {from} to {to})")]
    UuidChanged { from: Uuid, to: Uuid },

    /// The sequence number cannot grow any more (2^64 writes: unreachable in practice).
    #[error("the header sequence number is exhausted")]
    SequenceExhausted,

    /// The system random generator failed while making a salt.
    #[error("the system random generator failed")]
    Random,

    /// Reading, writing or flushing a header area failed.
    #[error("I/O on the header area failed")]
    Io(#[source] std::io::Error),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn key(b: u8) -> VolumeKey {
        let mut k = [b; 64];
        k[0] = b.wrapping_add(1);
        VolumeKey::from_slice(&k).unwrap()
    }

    pub(crate) fn sample(key: &VolumeKey) -> Header {
        let uuid = Uuid::from_bytes([0x11; 16]);
        let mut h = Header::new(uuid, SectorSize::S4096, DEFAULT_DATA_OFFSET, 1 << 20, None, key).unwrap();
        h.slots.push(KeySlot {
            id: 0,
            provider: "local".into(),
            key_id: "kek-1".into(),
            wrapped: vec![0xAA; 40],
            context: BTreeMap::from([("nbdcrypt:volume".to_owned(), uuid.to_string())]),
            created: 1_700_000_000,
        });
        h
    }

    #[test]
    fn new_header_verifies_with_its_key() {
        let k = key(1);
        let h = sample(&k);
        assert!(h.key_matches(&k));
        h.verify_mac(&k).unwrap();
    }

    #[test]
    fn wrong_key_does_not_match() {
        let h = sample(&key(1));
        assert!(!h.key_matches(&key(2)));
        assert!(matches!(h.check_key(&key(2)), Err(HeaderError::KeyMismatch)));
    }

    #[test]
    fn changing_trusted_fields_without_key_fails_mac() {
        let k = key(1);
        let h = sample(&k);
        let attacker = key(9);
        let edits: [fn(&mut Header); 4] = [
            |h| h.sector_size = SectorSize::S512,
            |h| h.data_offset += 4096,
            |h| h.data_size += 4096,
            |h| h.binding = Some(Binding { volume_id: "vol-0abc".into() }),
        ];
        for edit in edits {
            let mut t = h.clone();
            edit(&mut t);
            assert!(matches!(t.verify_mac(&k), Err(HeaderError::MacMismatch)));
            t.reseal(&attacker);
            assert!(matches!(t.verify_mac(&k), Err(HeaderError::MacMismatch)));
        }
    }

    #[test]
    fn slots_and_seq_are_outside_the_mac() {
        let k = key(1);
        let mut h = sample(&k);
        h.seq = 42;
        h.slots[0].wrapped = vec![0xBB; 50];
        h.verify_mac(&k).unwrap();
    }

    #[test]
    fn reseal_with_the_key_accepts_a_change() {
        let k = key(1);
        let mut h = sample(&k);
        h.data_size += 4096;
        h.reseal(&k);
        h.verify_mac(&k).unwrap();
    }

    #[test]
    fn next_slot_id_fills_gaps_and_stops_at_max() {
        let k = key(1);
        let mut h = sample(&k);
        assert_eq!(h.next_slot_id(), Some(1));
        let proto = h.slots[0].clone();
        h.slots = (0..MAX_SLOTS as u32).filter(|&i| i != 5).map(|id| KeySlot { id, ..proto.clone() }).collect();
        assert_eq!(h.next_slot_id(), Some(5));
        h.slots.push(KeySlot { id: 5, ..proto });
        assert_eq!(h.next_slot_id(), None);
    }

    #[test]
    fn new_refuses_data_offset_inside_header_area() {
        let r = Header::new(Uuid::nil(), SectorSize::S512, COPY_AREA, 4096, None, &key(1));
        assert!(matches!(r, Err(HeaderError::Field { field, .. }) if field == "data_offset"));
    }

    #[test]
    fn new_refuses_unaligned_data_size() {
        let r = Header::new(Uuid::nil(), SectorSize::S4096, DEFAULT_DATA_OFFSET, 512, None, &key(1));
        assert!(matches!(r, Err(HeaderError::Field { field, .. }) if field == "data_size"));
    }

    #[test]
    fn new_refuses_overflowing_data_area() {
        let r = Header::new(Uuid::nil(), SectorSize::S4096, DEFAULT_DATA_OFFSET, u64::MAX - 4095, None, &key(1));
        assert!(matches!(r, Err(HeaderError::Field { field, .. }) if field == "data_size"));
    }

    #[test]
    fn duplicate_slot_ids_are_refused() {
        let mut h = sample(&key(1));
        h.slots.push(h.slots[0].clone());
        assert!(matches!(h.validate(), Err(HeaderError::Field { field, .. }) if field == "slots[1].id"));
    }

    #[test]
    fn oversized_context_value_is_refused() {
        let mut h = sample(&key(1));
        h.slots[0].context.insert("k".into(), "v".repeat(MAX_SHORT_STRING + 1));
        assert!(matches!(h.validate(), Err(HeaderError::Field { .. })));
    }

    #[test]
    fn checkpoint_past_data_end_is_refused() {
        let mut h = sample(&key(1));
        h.checkpoint = Some(Checkpoint { kind: "reencrypt".into(), offset: h.data_size + 1, extra: BTreeMap::new() });
        assert!(matches!(h.validate(), Err(HeaderError::Field { field, .. }) if field == "reencrypt.offset"));
    }

    #[test]
    fn canonical_bytes_distinguish_binding_presence() {
        let mut h = sample(&key(1));
        let without = h.canonical_bytes();
        h.binding = Some(Binding { volume_id: String::new() });
        assert_ne!(without, h.canonical_bytes());
        assert!(Cipher::AesXtsPlain64.name().len() < 256);
    }

    #[test]
    fn zero_sectors_is_covered_by_the_mac_and_absent_when_off() {
        let k = key(1);
        let mut h = sample(&k);
        let before = h.canonical_bytes();
        h.zero_sectors = true;
        assert_ne!(before, h.canonical_bytes());
        // Turning the flag on without the key is detected.
        assert!(matches!(h.verify_mac(&k), Err(HeaderError::MacMismatch)));
        h.reseal(&k);
        h.verify_mac(&k).unwrap();
        // Off, the canonical bytes are those of a header that predates the flag.
        h.zero_sectors = false;
        assert_eq!(before, h.canonical_bytes());
    }

    #[test]
    fn cipher_display_is_its_name() {
        assert_eq!(Cipher::AesXtsPlain64.to_string(), "aes-xts-plain64");
        assert_eq!(Cipher::from_name("aes-xts-plain64"), Some(Cipher::AesXtsPlain64));
        assert_eq!(Cipher::from_name("aes-cbc-essiv:sha256"), None);
    }
}
