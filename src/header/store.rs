//! The two header copies on a [`Backend`]: loading the newer valid copy, crash-safe updates,
//! repair, and header backups.
//!
//! Crash safety rests on three facts: the two copy areas are disjoint, a flush is a write
//! barrier, and a copy is only trusted if its checksum verifies (so a torn write is detected,
//! never half-believed). An update writes the copy that is *not* the current source of truth
//! first, flushes, then the other, and flushes again; at every instant at least one copy is
//! valid and holds either the old or the new header. `docs/header-format.md` spells out the
//! argument.
//!
//! I/O errors are returned as they are, not taken as damage: a transient read error must not
//! make the store rewrite a copy it merely failed to read.

use super::disk::{self, CopyKind, AREA_LEN, BLOCK_LEN};
use super::{Header, HeaderError, COPY_AREA};
use crate::backend::Backend;

/// What one copy area holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// A valid header with this sequence number.
    Valid { seq: u64 },
    /// Nothing: the binary block is all zeros, or the volume ends before the area does.
    Blank,
    /// Something that is not a valid header, with the reason.
    Damaged(String),
}

/// A header as loaded, with what each copy holds (for logs, `is_degraded` and `repair`).
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The valid header with the highest sequence number (the primary's on a tie).
    pub header: Header,
    pub primary: CopyState,
    pub secondary: CopyState,
}

impl Loaded {
    /// True if a copy is damaged, blank, or older than the header in use: `repair` would
    /// rewrite it.
    pub fn is_degraded(&self) -> bool {
        self.stale_copy().is_some()
    }

    /// The copy the header was loaded from.
    pub fn source(&self) -> CopyKind {
        match self.primary {
            CopyState::Valid { seq } if seq == self.header.seq => CopyKind::Primary,
            _ => CopyKind::Secondary,
        }
    }

    /// The state of copy `which`.
    pub fn state(&self, which: CopyKind) -> &CopyState {
        match which {
            CopyKind::Primary => &self.primary,
            CopyKind::Secondary => &self.secondary,
        }
    }

    /// The copy that does not hold the current header, if any.
    fn stale_copy(&self) -> Option<CopyKind> {
        let other = self.source().other();
        match self.state(other) {
            CopyState::Valid { seq } if *seq == self.header.seq => None,
            _ => Some(other),
        }
    }
}

/// One copy area as read and examined.
enum Examined {
    Valid(Box<Header>),
    Blank,
    /// Damaged; `magic` tells whether it at least starts with an nbdcrypt magic.
    Damaged {
        err: HeaderError,
        magic: bool,
    },
}

/// Reads and decodes one copy area.
fn examine(dev: &dyn Backend, which: CopyKind) -> Result<Examined, HeaderError> {
    let fits = which.offset().checked_add(COPY_AREA).is_some_and(|end| end <= dev.size());
    if !fits {
        return Ok(Examined::Blank);
    }
    let mut area = vec![0u8; AREA_LEN];
    dev.read_at(&mut area, which.offset()).map_err(HeaderError::Io)?;
    if area[..BLOCK_LEN].iter().all(|&b| b == 0) {
        return Ok(Examined::Blank);
    }
    match disk::decode(&area, which) {
        Ok(h) => Ok(Examined::Valid(Box::new(h))),
        Err(err) => Ok(Examined::Damaged { err, magic: disk::has_magic(&area) }),
    }
}

/// Loads the header: the valid copy with the higher sequence number (the primary on a tie).
/// A damaged copy is reported in the returned states, for the caller to log and maybe
/// [`repair`]. No magic in either area is [`HeaderError::NotFound`]; a magic but no valid copy
/// is [`HeaderError::BothCopiesDamaged`] (or the unsupported version, if that is why). Also
/// refuses a header whose data area runs past the end of the volume.
pub fn load(dev: &dyn Backend) -> Result<Loaded, HeaderError> {
    let p = examine(dev, CopyKind::Primary)?;
    let s = examine(dev, CopyKind::Secondary)?;
    let loaded = match (p, s) {
        (Examined::Valid(ph), Examined::Valid(sh)) => pick_newer(*ph, *sh),
        (Examined::Valid(h), other) => {
            Loaded { primary: CopyState::Valid { seq: h.seq }, secondary: state_of(&other), header: *h }
        }
        (other, Examined::Valid(h)) => {
            Loaded { primary: state_of(&other), secondary: CopyState::Valid { seq: h.seq }, header: *h }
        }
        (p, s) => return Err(neither_valid(p, s)),
    };
    let needed = loaded.header.data_end().unwrap_or(u64::MAX);
    if needed > dev.size() {
        return Err(HeaderError::VolumeTooSmall { size: dev.size(), needed });
    }
    Ok(loaded)
}

fn pick_newer(ph: Header, sh: Header) -> Loaded {
    let primary = CopyState::Valid { seq: ph.seq };
    let secondary = CopyState::Valid { seq: sh.seq };
    if sh.seq > ph.seq {
        return Loaded { header: sh, primary, secondary };
    }
    if sh.seq == ph.seq && sh != ph {
        // Never written by this code (both copies of one seq are encoded from one header):
        // trust the primary, call the secondary damaged so that repair overwrites it.
        let secondary =
            CopyState::Damaged(format!("same sequence number {} as the primary but different contents", sh.seq));
        return Loaded { header: ph, primary, secondary };
    }
    Loaded { header: ph, primary, secondary }
}

fn state_of(e: &Examined) -> CopyState {
    match e {
        Examined::Valid(h) => CopyState::Valid { seq: h.seq },
        Examined::Blank => CopyState::Blank,
        Examined::Damaged { err, .. } => CopyState::Damaged(err.to_string()),
    }
}

fn neither_valid(p: Examined, s: Examined) -> HeaderError {
    let magic = |e: &Examined| matches!(e, Examined::Damaged { magic: true, .. });
    if !magic(&p) && !magic(&s) {
        return HeaderError::NotFound;
    }
    for e in [&p, &s] {
        if let Examined::Damaged { err: HeaderError::UnsupportedVersion(v), .. } = e {
            return HeaderError::UnsupportedVersion(*v);
        }
    }
    let reason = |e: &Examined| match e {
        Examined::Blank => "blank".to_owned(),
        Examined::Valid(_) => "valid".to_owned(),
        Examined::Damaged { err, .. } => err.to_string(),
    };
    HeaderError::BothCopiesDamaged { primary: reason(&p), secondary: reason(&s) }
}

/// True if either copy area starts with an nbdcrypt magic (of either copy): the volume was
/// formatted, or was being formatted. Use it before formatting to refuse overwriting.
pub fn probe(dev: &dyn Backend) -> Result<bool, HeaderError> {
    for which in CopyKind::ALL {
        let mut magic = [0u8; 8];
        let fits = which.offset().checked_add(8).is_some_and(|end| end <= dev.size());
        if !fits {
            continue;
        }
        dev.read_at(&mut magic, which.offset()).map_err(HeaderError::Io)?;
        if disk::has_magic(&magic) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The volume uuid recorded in the binary block of either copy that starts with an nbdcrypt
/// magic, even if the copy is otherwise damaged (primary first). Unverified: only for
/// refusing to restore another volume's header backup over a damaged one.
pub fn peek_uuid(dev: &dyn Backend) -> Result<Option<uuid::Uuid>, HeaderError> {
    for which in CopyKind::ALL {
        let mut block = [0u8; disk::OFF_UUID + 16];
        let fits = which.offset().checked_add(block.len() as u64).is_some_and(|end| end <= dev.size());
        if !fits {
            continue;
        }
        dev.read_at(&mut block, which.offset()).map_err(HeaderError::Io)?;
        if disk::has_magic(&block) {
            let mut id = [0u8; 16];
            id.copy_from_slice(&block[disk::OFF_UUID..]);
            return Ok(Some(uuid::Uuid::from_bytes(id)));
        }
    }
    Ok(None)
}

/// Formats: writes `h` to both copies with `seq = 1` (set in `h`), flushing after each.
///
/// The secondary's binary block is zeroed (and flushed) first, so a crash part-way can never
/// leave a new primary beside an old, higher-sequence secondary of a previous format: the
/// volume holds the old header, the new one, or (new primary, blank secondary) a degraded new
/// one. Refuses a header whose data area does not fit on the volume. Whether an existing
/// header may be overwritten is the caller's decision ([`probe`]).
pub fn write_new(dev: &dyn Backend, h: &mut Header) -> Result<(), HeaderError> {
    let needed = h.data_end().unwrap_or(u64::MAX);
    if needed > dev.size() {
        return Err(HeaderError::VolumeTooSmall { size: dev.size(), needed });
    }
    h.seq = 1;
    let primary = disk::encode(h, CopyKind::Primary)?;
    let secondary = disk::encode(h, CopyKind::Secondary)?;
    write(dev, &[0u8; BLOCK_LEN], CopyKind::Secondary.offset())?;
    write(dev, &primary, CopyKind::Primary.offset())?;
    write(dev, &secondary, CopyKind::Secondary.offset())
}

/// Writes `h` as the next version of the header `loaded` came from: `seq` becomes one more
/// than the highest valid sequence number (set in `h`); the copy that is not the current
/// source of truth is written and flushed first, then the source. `h` must describe the same
/// volume (same uuid). `loaded` is stale afterwards: load again to see the new states.
pub fn update(dev: &dyn Backend, loaded: &Loaded, h: &mut Header) -> Result<(), HeaderError> {
    if h.uuid != loaded.header.uuid {
        return Err(HeaderError::UuidChanged { from: loaded.header.uuid, to: h.uuid });
    }
    let highest = [&loaded.primary, &loaded.secondary]
        .into_iter()
        .filter_map(|s| match s {
            CopyState::Valid { seq } => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap_or(loaded.header.seq)
        .max(loaded.header.seq);
    h.seq = highest.checked_add(1).ok_or(HeaderError::SequenceExhausted)?;
    let first = loaded.source().other();
    let second = first.other();
    // Encode both before writing anything, so an invalid header changes nothing on disk.
    let first_area = disk::encode(h, first)?;
    let second_area = disk::encode(h, second)?;
    write(dev, &first_area, first.offset())?;
    write(dev, &second_area, second.offset())
}

/// Rewrites the copy that is damaged, blank or stale from the loaded header (same sequence
/// number), and flushes. Returns which copy was rewritten, `None` if both were fine. Safe
/// against crashes: the source copy is not touched.
pub fn repair(dev: &dyn Backend, loaded: &Loaded) -> Result<Option<CopyKind>, HeaderError> {
    let Some(target) = loaded.stale_copy() else {
        return Ok(None);
    };
    let area = disk::encode(&loaded.header, target)?;
    write(dev, &area, target.offset())?;
    Ok(Some(target))
}

/// The contents of a header backup file: the loaded header encoded as a primary copy area
/// ([`COPY_AREA`] bytes). One copy is enough: the file is a copy in itself.
pub fn backup_bytes(loaded: &Loaded) -> Result<Vec<u8>, HeaderError> {
    disk::encode(&loaded.header, CopyKind::Primary)
}

/// Reads a header backup file's contents (see [`backup_bytes`]). The caller bounds the file
/// size (to [`COPY_AREA`]) before reading it.
pub fn read_backup(bytes: &[u8]) -> Result<Header, HeaderError> {
    disk::decode(bytes, CopyKind::Primary)
}

/// Writes `bytes` at `offset` and flushes.
fn write(dev: &dyn Backend, bytes: &[u8], offset: u64) -> Result<(), HeaderError> {
    dev.write_at(bytes, offset).map_err(HeaderError::Io)?;
    dev.flush().map_err(HeaderError::Io)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::backend::MemBackend;
    use crate::header::tests::{key, sample};

    const DEV: usize = 4 << 20;

    fn formatted() -> (MemBackend, Header) {
        let dev = MemBackend::new(DEV);
        let mut h = sample(&key(1));
        write_new(&dev, &mut h).unwrap();
        (dev, h)
    }

    fn area(dev: &MemBackend, which: CopyKind) -> Vec<u8> {
        let start = which.offset() as usize;
        dev.snapshot()[start..start + AREA_LEN].to_vec()
    }

    fn smash(dev: &MemBackend, which: CopyKind) {
        // Flip a byte of the checksum: magic intact, contents unverifiable.
        let at = which.offset() as usize + 60;
        let b = dev.snapshot()[at];
        dev.poke(at, &[b ^ 0xFF]);
    }

    #[test]
    fn probe_on_zeros_is_false() {
        assert!(!probe(&MemBackend::new(DEV)).unwrap());
    }

    #[test]
    fn probe_after_format_is_true() {
        assert!(probe(&formatted().0).unwrap());
    }

    #[test]
    fn load_on_zeros_is_not_found() {
        assert!(matches!(load(&MemBackend::new(DEV)), Err(HeaderError::NotFound)));
    }

    #[test]
    fn load_on_foreign_data_is_not_found() {
        let dev = MemBackend::new(DEV);
        dev.poke(0, b"\xEB\x3C\x90mkfs.fat");
        assert!(matches!(load(&dev), Err(HeaderError::NotFound)));
    }

    #[test]
    fn format_then_load_gives_both_copies_valid() {
        let (dev, h) = formatted();
        let l = load(&dev).unwrap();
        assert_eq!(l.header, h);
        assert_eq!(l.header.seq, 1);
        assert_eq!(
            (l.primary.clone(), l.secondary.clone()),
            (CopyState::Valid { seq: 1 }, CopyState::Valid { seq: 1 })
        );
        assert!(!l.is_degraded());
        assert!(dev.flush_count() >= 3);
    }

    #[test]
    fn damaged_primary_loads_from_secondary_and_reports_it() {
        let (dev, h) = formatted();
        smash(&dev, CopyKind::Primary);
        let l = load(&dev).unwrap();
        assert_eq!(l.header, h);
        assert!(matches!(l.primary, CopyState::Damaged(_)));
        assert_eq!(l.source(), CopyKind::Secondary);
        assert!(l.is_degraded());
    }

    #[test]
    fn both_damaged_is_an_error() {
        let (dev, _) = formatted();
        smash(&dev, CopyKind::Primary);
        smash(&dev, CopyKind::Secondary);
        assert!(matches!(load(&dev), Err(HeaderError::BothCopiesDamaged { .. })));
    }

    #[test]
    fn damaged_primary_and_blank_secondary_is_an_error() {
        let (dev, _) = formatted();
        smash(&dev, CopyKind::Primary);
        dev.poke(COPY_AREA as usize, &[0u8; BLOCK_LEN]);
        assert!(matches!(load(&dev), Err(HeaderError::BothCopiesDamaged { .. })));
    }

    #[test]
    fn higher_seq_wins() {
        let (dev, mut h) = formatted();
        let l = load(&dev).unwrap();
        h.slots.clear();
        update(&dev, &l, &mut h).unwrap();
        let l = load(&dev).unwrap();
        assert_eq!(l.header.seq, 2);
        assert!(l.header.slots.is_empty());
        assert!(!l.is_degraded());
    }

    #[test]
    fn update_writes_the_non_source_copy_first() {
        let (dev, mut h) = formatted();
        smash(&dev, CopyKind::Secondary);
        let l = load(&dev).unwrap();
        assert_eq!(l.source(), CopyKind::Primary);
        let before = area(&dev, CopyKind::Primary);
        // A backend that fails every write after the first shows the order.
        let only_one = FailAfter { inner: dev, writes_left: AtomicU32::new(1) };
        assert!(update(&only_one, &l, &mut h).is_err());
        assert_eq!(area(&only_one.inner, CopyKind::Primary), before);
        assert_eq!(load(&only_one.inner).unwrap().header.seq, 2);
    }

    #[test]
    fn crash_after_first_copy_loads_the_new_header() {
        let (dev, mut h) = formatted();
        let l = load(&dev).unwrap();
        h.slots[0].key_id = "kek-2".into();
        h.seq = 2;
        // Simulate the first half of `update`: only the non-source (secondary) is written.
        dev.poke(COPY_AREA as usize, &disk::encode(&h, CopyKind::Secondary).unwrap());
        let after = load(&dev).unwrap();
        assert_eq!(after.header.seq, 2);
        assert_eq!(after.header.slots[0].key_id, "kek-2");
        assert!(after.is_degraded());
        assert_eq!(l.header.seq, 1);
    }

    #[test]
    fn torn_first_copy_loads_the_old_header() {
        let (_, old) = formatted();
        let mut new = old.clone();
        new.slots[0].key_id = "kek-2".into();
        new.seq = 2;
        let new_area = disk::encode(&new, CopyKind::Secondary).unwrap();
        // Torn inside the block, right after it, and inside the JSON.
        for torn_at in [512, BLOCK_LEN, BLOCK_LEN + 100] {
            let dev = MemBackend::new(DEV);
            write_new(&dev, &mut old.clone()).unwrap();
            dev.poke(COPY_AREA as usize, &new_area[..torn_at]);
            let l = load(&dev).unwrap();
            assert_eq!(l.header, old, "torn at {torn_at}");
            assert!(l.is_degraded());
        }
    }

    #[test]
    fn torn_second_copy_loads_the_new_header() {
        let (dev, mut h) = formatted();
        let l = load(&dev).unwrap();
        let old_primary = area(&dev, CopyKind::Primary);
        h.slots[0].key_id = "kek-2".into();
        update(&dev, &l, &mut h).unwrap();
        // Tear the second write (the primary): new binary block, old JSON behind it.
        dev.poke(BLOCK_LEN, &old_primary[BLOCK_LEN..]);
        let l = load(&dev).unwrap();
        assert!(matches!(l.primary, CopyState::Damaged(_)));
        assert_eq!(l.header.seq, 2);
        assert_eq!(l.header.slots[0].key_id, "kek-2");
    }

    #[test]
    fn repair_rewrites_the_damaged_copy() {
        let (dev, h) = formatted();
        smash(&dev, CopyKind::Primary);
        let l = load(&dev).unwrap();
        assert_eq!(repair(&dev, &l).unwrap(), Some(CopyKind::Primary));
        let l = load(&dev).unwrap();
        assert!(!l.is_degraded());
        assert_eq!(l.header, h);
        assert_eq!(repair(&dev, &l).unwrap(), None);
    }

    #[test]
    fn repair_brings_a_stale_copy_up_to_date() {
        let (dev, mut h) = formatted();
        h.seq = 2;
        dev.poke(COPY_AREA as usize, &disk::encode(&h, CopyKind::Secondary).unwrap());
        let l = load(&dev).unwrap();
        assert_eq!(repair(&dev, &l).unwrap(), Some(CopyKind::Primary));
        assert_eq!(load(&dev).unwrap().primary, CopyState::Valid { seq: 2 });
    }

    #[test]
    fn unsupported_version_in_both_copies_is_reported_as_such() {
        let (dev, _) = formatted();
        dev.poke(8, &2u16.to_be_bytes());
        dev.poke(COPY_AREA as usize + 8, &2u16.to_be_bytes());
        assert!(matches!(load(&dev), Err(HeaderError::UnsupportedVersion(2))));
    }

    #[test]
    fn format_refuses_a_data_area_past_the_end() {
        let dev = MemBackend::new(DEV);
        let mut h = sample(&key(1));
        h.data_size = 4 << 20;
        assert!(matches!(write_new(&dev, &mut h), Err(HeaderError::VolumeTooSmall { .. })));
        assert!(!probe(&dev).unwrap());
    }

    #[test]
    fn reformat_over_an_old_header_never_mixes_them() {
        let (dev, mut h) = formatted();
        for _ in 0..3 {
            let l = load(&dev).unwrap();
            update(&dev, &l, &mut h).unwrap();
        }
        let mut fresh = sample(&key(2));
        fresh.uuid = uuid::Uuid::from_bytes([0x33; 16]);
        write_new(&dev, &mut fresh).unwrap();
        let l = load(&dev).unwrap();
        assert_eq!(l.header.uuid, fresh.uuid);
        assert!(!l.is_degraded());
    }

    #[test]
    fn update_refuses_a_different_uuid() {
        let (dev, mut h) = formatted();
        let l = load(&dev).unwrap();
        h.uuid = uuid::Uuid::nil();
        assert!(matches!(update(&dev, &l, &mut h), Err(HeaderError::UuidChanged { .. })));
    }

    #[test]
    fn peek_uuid_reads_a_damaged_copy() {
        let (dev, h) = formatted();
        smash(&dev, CopyKind::Primary);
        smash(&dev, CopyKind::Secondary);
        assert!(load(&dev).is_err());
        assert_eq!(peek_uuid(&dev).unwrap(), Some(h.uuid));
        assert_eq!(peek_uuid(&MemBackend::new(DEV)).unwrap(), None);
    }

    #[test]
    fn backup_round_trips() {
        let (dev, h) = formatted();
        smash(&dev, CopyKind::Primary);
        let l = load(&dev).unwrap();
        let bytes = backup_bytes(&l).unwrap();
        assert_eq!(bytes.len() as u64, COPY_AREA);
        assert_eq!(read_backup(&bytes).unwrap(), h);
    }

    /// A backend that lets `writes_left` writes through, then fails every write.
    #[derive(Debug)]
    struct FailAfter {
        inner: MemBackend,
        writes_left: AtomicU32,
    }

    impl Backend for FailAfter {
        fn size(&self) -> u64 {
            self.inner.size()
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let left = self.writes_left.load(Ordering::Relaxed);
            if left == 0 {
                return Err(std::io::Error::other("simulated crash"));
            }
            self.writes_left.store(left - 1, Ordering::Relaxed);
            self.inner.write_at(buf, offset)
        }

        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }

        fn describe(&self) -> String {
            "fail-after".into()
        }
    }
}
