//! The tail journal of the in-place operations (`encrypt`, `decrypt`, `reencrypt`): a 3 MiB
//! area at the very end of the raw volume, past the data area, that holds everything a resumed
//! run needs. `docs/reencryption.md` gives the crash-safety argument; this module is the codec
//! and the I/O on that area.
//!
//! ```text
//! journal start = align_down(device size, 4096) - JOURNAL_LEN
//! +0      4 KiB   record slot 0   (records with an even sequence number)
//! +4 KiB  4 KiB   record slot 1   (odd)
//! +64 KiB ...     static descriptor: the plan and the header images, written once
//! +1 MiB  1 MiB   backup slot 0   (reencrypt: old ciphertext of the chunk in flight, even seq)
//! +2 MiB  1 MiB   backup slot 1   (odd)
//! ```
//!
//! The **static descriptor** is written and flushed once, before the first record. It is the
//! anchor: a record is only believed if its `static_sha256` matches the descriptor, and the
//! operation is over as soon as the descriptor is wiped. It carries the header images (encoded
//! like a header copy, block + JSON) that hold the wrapped keys: for `encrypt` the new header
//! (no header exists at offset 0 until the end), for `decrypt` the old header (the first chunk
//! overwrites offset 0), for `reencrypt` both.
//!
//! **Records** are written alternately to slot `seq % 2`, so the previous record stays intact
//! while the next one is written: a torn record is seen as invalid and the other slot, one step
//! older, is used. Every record is authenticated with HMAC-SHA256 under a key derived from the
//! *guard key* (the key that the descriptor's images let a resumed run unwrap first: the new key
//! for `encrypt`, the old key otherwise) and covers the descriptor's hash, so nobody without the
//! key can forge progress or swap the new key of a re-encryption.
//!
//! All integers are big-endian.

use crate::backend::Backend;
use crate::crypto::kdf::{derive, mac, mac_eq, sha256};
use crate::crypto::VolumeKey;
use crate::header::{disk, CopyKind, Header, HeaderError};
use crate::units::SectorSize;

use super::MigrateError;

/// Length of the journal area at the end of the volume.
pub const JOURNAL_LEN: u64 = 3 << 20;
/// Length of one record slot.
pub const RECORD_LEN: usize = 4096;
/// Offset of the static descriptor within the journal area.
pub const STATIC_OFFSET: u64 = 64 << 10;
/// Longest static descriptor (fixed block plus images).
pub const STATIC_MAX: usize = (1 << 20) - (64 << 10);
/// Offset of backup slot 0 within the journal area; slot 1 follows it.
pub const BACKUP_OFFSET: u64 = 1 << 20;
/// Length of one backup slot, hence the largest re-encryption chunk.
pub const BACKUP_LEN: u64 = 1 << 20;

const STATIC_MAGIC: [u8; 8] = *b"NBDCJSTA";
const RECORD_MAGIC: [u8; 8] = *b"NBDCJREC";
const VERSION: u16 = 1;
const STATIC_BLOCK: usize = 4096;
/// HKDF label of the record MAC key; changing it changes the on-disk format.
pub const LABEL_JOURNAL_MAC: &[u8] = b"nbdcrypt v1 journal mac";

/// The in-place operation a journal describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Plaintext at offset 0 becomes ciphertext at the data offset (data moves towards the end).
    Encrypt,
    /// Ciphertext at the data offset becomes plaintext at offset 0 (data moves towards the start).
    Decrypt,
    /// Ciphertext under the old key becomes ciphertext under a new key, in place.
    Reencrypt,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Encrypt => 1,
            Op::Decrypt => 2,
            Op::Reencrypt => 3,
        }
    }

    fn from_code(c: u8) -> Option<Op> {
        match c {
            1 => Some(Op::Encrypt),
            2 => Some(Op::Decrypt),
            3 => Some(Op::Reencrypt),
            _ => None,
        }
    }

    /// The name used on the command line and in the header checkpoint.
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Reencrypt => "reencrypt",
        }
    }
}

/// Where the journal area of a volume of `device_size` bytes starts, if the volume holds one.
pub fn journal_start(device_size: u64) -> Option<u64> {
    (device_size & !4095).checked_sub(JOURNAL_LEN)
}

/// The plan of one in-place operation, fixed when it starts (the static descriptor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub op: Op,
    /// Random id of this run; records of another run never match.
    pub id: [u8; 16],
    pub sector_size: SectorSize,
    /// Raw volume size when the operation started (the journal's place depends on it).
    pub device_size: u64,
    /// Bytes of data processed (the plaintext volume's size, the header's `data_size`).
    pub data_len: u64,
    /// Raw offset of data byte 0 before and after the operation.
    pub old_offset: u64,
    pub new_offset: u64,
    /// Bytes per step: at most the shift for encrypt/decrypt, at most [`BACKUP_LEN`] for
    /// reencrypt; a multiple of the sector size.
    pub chunk: u64,
    /// The header the data is encrypted under before (decrypt, reencrypt), encoded as a
    /// primary copy, block + JSON only.
    pub old_image: Vec<u8>,
    /// The header it is encrypted under after (encrypt, reencrypt).
    pub new_image: Vec<u8>,
}

/// A header as a compact image (block + JSON, no padding).
pub fn header_image(h: &Header) -> Result<Vec<u8>, HeaderError> {
    let mut area = disk::encode(h, CopyKind::Primary)?;
    let json_len = u32::from_be_bytes([area[12], area[13], area[14], area[15]]) as usize;
    area.truncate(disk::BLOCK_LEN + json_len);
    Ok(area)
}

/// Decodes a header image (every check of a header copy applies).
pub fn decode_image(image: &[u8]) -> Result<Header, HeaderError> {
    disk::decode(image, CopyKind::Primary)
}

impl Plan {
    /// Encodes the static descriptor; refuses images that do not fit.
    pub fn encode(&self) -> Result<Vec<u8>, MigrateError> {
        let total = STATIC_BLOCK + self.old_image.len() + self.new_image.len();
        if total > STATIC_MAX {
            return Err(MigrateError::Invalid(format!(
                "the header images take {total} bytes, more than the {STATIC_MAX} the journal holds"
            )));
        }
        let mut b = vec![0u8; STATIC_BLOCK];
        b[0..8].copy_from_slice(&STATIC_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_be_bytes());
        b[10] = self.op.code();
        b[12..16].copy_from_slice(&self.sector_size.bytes().to_be_bytes());
        b[16..32].copy_from_slice(&self.id);
        b[32..40].copy_from_slice(&self.device_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.data_len.to_be_bytes());
        b[48..56].copy_from_slice(&self.old_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.new_offset.to_be_bytes());
        b[64..72].copy_from_slice(&self.chunk.to_be_bytes());
        // Both images are bounded by STATIC_MAX above, so the casts cannot truncate.
        b[72..76].copy_from_slice(&(self.old_image.len() as u32).to_be_bytes());
        b[76..80].copy_from_slice(&(self.new_image.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.old_image);
        b.extend_from_slice(&self.new_image);
        let sum = static_sum(&b);
        b[80..112].copy_from_slice(&sum);
        Ok(b)
    }

    /// Decodes a static descriptor read from the journal area (`bytes` may be longer).
    /// `None` if there is none or it is damaged (checksum).
    pub fn decode(bytes: &[u8]) -> Option<Plan> {
        let b = bytes.get(..STATIC_BLOCK)?;
        if b[0..8] != STATIC_MAGIC || u16::from_be_bytes([b[8], b[9]]) != VERSION {
            return None;
        }
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let old_len = u32_at(72) as usize;
        let new_len = u32_at(76) as usize;
        let total = STATIC_BLOCK.checked_add(old_len)?.checked_add(new_len)?;
        if total > STATIC_MAX {
            return None;
        }
        let whole = bytes.get(..total)?;
        if !mac_eq(&static_sum(whole), &b[80..112]) {
            return None;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        Some(Plan {
            op: Op::from_code(b[10])?,
            id,
            sector_size: SectorSize::new(u32_at(12))?,
            device_size: u64_at(32),
            data_len: u64_at(40),
            old_offset: u64_at(48),
            new_offset: u64_at(56),
            chunk: u64_at(64),
            old_image: whole[STATIC_BLOCK..STATIC_BLOCK + old_len].to_vec(),
            new_image: whole[STATIC_BLOCK + old_len..total].to_vec(),
        })
    }

    /// SHA-256 of the encoded descriptor: what records are bound to.
    pub fn digest(&self) -> Result<[u8; 32], MigrateError> {
        Ok(sha256(&self.encode()?))
    }
}

/// SHA-256 of a descriptor with its checksum field (bytes 80..112) taken as zero.
fn static_sum(b: &[u8]) -> [u8; 32] {
    let mut copy = b.to_vec();
    copy[80..112].fill(0);
    sha256(&copy)
}

/// Where an operation stands, as one record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Strictly increasing; the record lives in slot `seq % 2`.
    pub seq: u64,
    /// Everything on one side of `done` is in the new layout: `[done, data_len)` when the data
    /// moves towards the end (encrypt), `[0, done)` otherwise.
    pub done: u64,
    /// Set when every chunk is done and the final header is written: only the wipe is left.
    pub complete: bool,
    /// Reencrypt: the chunk `[start, start + len)` being rewritten, whose old ciphertext is in
    /// backup slot `seq % 2` with this SHA-256.
    pub inflight: Option<Inflight>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inflight {
    pub start: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

impl Record {
    /// Encodes the record, authenticated under `guard` and bound to the plan.
    pub fn encode(&self, plan_id: &[u8; 16], static_digest: &[u8; 32], guard: &VolumeKey) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&RECORD_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_be_bytes());
        b[10] = u8::from(self.complete);
        b[11] = u8::from(self.inflight.is_some());
        b[16..32].copy_from_slice(plan_id);
        b[32..40].copy_from_slice(&self.seq.to_be_bytes());
        b[40..48].copy_from_slice(&self.done.to_be_bytes());
        if let Some(i) = &self.inflight {
            b[48..56].copy_from_slice(&i.start.to_be_bytes());
            b[56..64].copy_from_slice(&i.len.to_be_bytes());
            b[64..96].copy_from_slice(&i.sha256);
        }
        b[96..128].copy_from_slice(static_digest);
        let tag = record_mac(guard, plan_id, &b[..128]);
        b[128..160].copy_from_slice(&tag);
        b
    }

    /// Decodes and authenticates a record; `None` if blank, torn, forged or of another plan.
    pub fn decode(b: &[u8], plan_id: &[u8; 16], static_digest: &[u8; 32], guard: &VolumeKey) -> Option<Record> {
        let b = b.get(..RECORD_LEN)?;
        if b[0..8] != RECORD_MAGIC || u16::from_be_bytes([b[8], b[9]]) != VERSION {
            return None;
        }
        if !mac_eq(&record_mac(guard, plan_id, &b[..128]), &b[128..160]) {
            return None;
        }
        if &b[16..32] != plan_id || &b[96..128] != static_digest || b[10] > 1 || b[11] > 1 {
            return None;
        }
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let inflight = (b[11] == 1).then(|| {
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&b[64..96]);
            Inflight { start: u64_at(48), len: u64_at(56), sha256 }
        });
        Some(Record { seq: u64_at(32), done: u64_at(40), complete: b[10] == 1, inflight })
    }
}

fn record_mac(guard: &VolumeKey, plan_id: &[u8; 16], body: &[u8]) -> [u8; 32] {
    let k = derive(guard, plan_id, LABEL_JOURNAL_MAC);
    mac(&k, &[body])
}

/// The journal area of one volume.
#[derive(Debug, Clone, Copy)]
pub struct Journal {
    pub start: u64,
}

impl Journal {
    /// The journal area of `dev`, if it is large enough to hold one.
    pub fn of(dev: &dyn Backend) -> Option<Journal> {
        journal_start(dev.size()).map(|start| Journal { start })
    }

    /// Reads the static descriptor, if a valid one is there.
    pub fn read_plan(&self, dev: &dyn Backend) -> Result<Option<Plan>, MigrateError> {
        let mut head = vec![0u8; STATIC_BLOCK];
        dev.read_at(&mut head, self.start + STATIC_OFFSET).map_err(MigrateError::io("reading the journal"))?;
        if head[0..8] != STATIC_MAGIC {
            return Ok(None);
        }
        let mut all = vec![0u8; STATIC_MAX];
        dev.read_at(&mut all, self.start + STATIC_OFFSET).map_err(MigrateError::io("reading the journal"))?;
        Ok(Plan::decode(&all))
    }

    /// Writes the static descriptor and flushes.
    pub fn write_plan(&self, dev: &dyn Backend, plan: &Plan) -> Result<(), MigrateError> {
        let bytes = plan.encode()?;
        dev.write_at(&bytes, self.start + STATIC_OFFSET).map_err(MigrateError::io("writing the journal"))?;
        dev.flush().map_err(MigrateError::io("flushing the journal"))
    }

    /// The newest valid record of `plan`, if any.
    pub fn latest(&self, dev: &dyn Backend, plan: &Plan, guard: &VolumeKey) -> Result<Option<Record>, MigrateError> {
        let digest = plan.digest()?;
        let mut best: Option<Record> = None;
        for slot in 0..2u64 {
            let mut b = vec![0u8; RECORD_LEN];
            dev.read_at(&mut b, self.start + slot * RECORD_LEN as u64)
                .map_err(MigrateError::io("reading a journal record"))?;
            if let Some(r) = Record::decode(&b, &plan.id, &digest, guard) {
                if r.seq % 2 == slot && best.as_ref().is_none_or(|b| r.seq > b.seq) {
                    best = Some(r);
                }
            }
        }
        Ok(best)
    }

    /// Writes `rec` to its slot (`seq % 2`). Does not flush: the caller decides the barrier.
    pub fn write_record(
        &self,
        dev: &dyn Backend,
        plan: &Plan,
        digest: &[u8; 32],
        guard: &VolumeKey,
        rec: &Record,
    ) -> Result<(), MigrateError> {
        let b = rec.encode(&plan.id, digest, guard);
        dev.write_at(&b, self.start + (rec.seq % 2) * RECORD_LEN as u64)
            .map_err(MigrateError::io("writing a journal record"))
    }

    /// Raw offset of backup slot `slot` (0 or 1).
    pub fn backup_at(&self, slot: u64) -> u64 {
        self.start + BACKUP_OFFSET + (slot % 2) * BACKUP_LEN
    }

    /// Ends the operation: wipes the static descriptor (from then on nothing is resumed), flushes,
    /// then wipes the records and backups (they hold no plaintext, but nothing should linger).
    pub fn wipe(&self, dev: &dyn Backend) -> Result<(), MigrateError> {
        let io = MigrateError::io("wiping the journal");
        let zeros = vec![0u8; STATIC_MAX];
        dev.write_at(&zeros, self.start + STATIC_OFFSET).map_err(&io)?;
        dev.flush().map_err(&io)?;
        dev.write_at(&zeros[..2 * RECORD_LEN], self.start).map_err(&io)?;
        let big = vec![0u8; (2 * BACKUP_LEN) as usize];
        dev.write_at(&big, self.start + BACKUP_OFFSET).map_err(&io)?;
        dev.flush().map_err(&io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::tests::{key, sample};

    fn plan() -> Plan {
        let h = sample(&key(1));
        Plan {
            op: Op::Reencrypt,
            id: [7; 16],
            sector_size: SectorSize::S4096,
            device_size: 64 << 20,
            data_len: 32 << 20,
            old_offset: 2 << 20,
            new_offset: 2 << 20,
            chunk: 1 << 20,
            old_image: header_image(&h).unwrap(),
            new_image: header_image(&h).unwrap(),
        }
    }

    #[test]
    fn plan_round_trips_and_images_decode() {
        let p = plan();
        let bytes = p.encode().unwrap();
        let back = Plan::decode(&bytes).unwrap();
        assert_eq!(back, p);
        assert_eq!(decode_image(&back.old_image).unwrap(), decode_image(&p.old_image).unwrap());
    }

    #[test]
    fn damaged_plan_is_ignored() {
        let mut bytes = plan().encode().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(Plan::decode(&bytes).is_none());
    }

    #[test]
    fn record_round_trips_and_needs_the_guard_key() {
        let p = plan();
        let d = p.digest().unwrap();
        let r = Record {
            seq: 5,
            done: 3 << 20,
            complete: false,
            inflight: Some(Inflight { start: 1, len: 2, sha256: [9; 32] }),
        };
        let b = r.encode(&p.id, &d, &key(1));
        assert_eq!(Record::decode(&b, &p.id, &d, &key(1)), Some(r));
        assert_eq!(Record::decode(&b, &p.id, &d, &key(2)), None);
        assert_eq!(Record::decode(&b, &p.id, &[0; 32], &key(1)), None);
    }

    #[test]
    fn journal_start_is_aligned_and_at_the_end() {
        assert_eq!(journal_start((16 << 20) + 100), Some((16 << 20) - JOURNAL_LEN));
        assert_eq!(journal_start(1 << 20), None);
    }
}
