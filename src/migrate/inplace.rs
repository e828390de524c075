//! The engine of the in-place operations: `encrypt` (datashift towards the end, from the last
//! chunk backwards), `decrypt` (datashift towards the start, first chunk forwards) and
//! `reencrypt` (in place, each chunk's old ciphertext backed up in the journal first).
//!
//! Everything here is synchronous and runs on a [`Backend`] with the keys already unwrapped,
//! so the unit tests can crash it at every write and check the result byte for byte. The
//! crash-safety argument, step by step, is in `docs/reencryption.md`; the invariants each
//! function keeps are repeated at the point where they matter.

use crate::backend::Backend;
use crate::crypto::kdf::sha256;
use crate::crypto::{SectorCipher, VolumeKey};
use crate::header::{store, Checkpoint, Header};

use super::journal::{decode_image, Inflight, Journal, Op, Plan, Record, BACKUP_LEN};
use super::{checkpoint_mac, MigrateError};

/// The unwrapped keys of an operation: `old` for decrypt and reencrypt, `new` for encrypt and
/// reencrypt.
#[derive(Debug, Default)]
pub struct Keys {
    pub old: Option<VolumeKey>,
    pub new: Option<VolumeKey>,
}

impl Keys {
    /// The key that authenticates the journal records of `op`: the one a resumed run can
    /// unwrap first (there is only the new one for encrypt).
    pub fn guard(&self, op: Op) -> Option<&VolumeKey> {
        match op {
            Op::Encrypt => self.new.as_ref(),
            Op::Decrypt | Op::Reencrypt => self.old.as_ref(),
        }
    }
}

/// Called after every chunk with the number of data bytes done so far (for progress, and for
/// the test throttle).
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// Starts an operation: for decrypt and reencrypt marks the header at offset 0 as busy (so
/// `serve` refuses it), then writes the plan and the first record, each flushed, before any
/// data is touched. Then runs it to the end.
pub fn start(dev: &dyn Backend, plan: &Plan, keys: &Keys, progress: Progress<'_>) -> Result<(), MigrateError> {
    let journal =
        Journal::of(dev).ok_or_else(|| MigrateError::Invalid("the device has no room for a journal".into()))?;
    let guard = keys.guard(plan.op).ok_or_else(|| MigrateError::Invalid("missing key".into()))?;
    if plan.op != Op::Encrypt {
        let key = keys.old.as_ref().ok_or_else(|| MigrateError::Invalid("missing old key".into()))?;
        mark_busy(dev, plan, key)?;
    }
    journal.write_plan(dev, plan)?;
    let first = Record { seq: 1, done: initial_done(plan), complete: false, inflight: None };
    journal.write_record(dev, plan, &plan.digest()?, guard, &first)?;
    dev.flush().map_err(MigrateError::io("flushing the journal"))?;
    run(dev, journal, plan, keys, first, progress)
}

/// Records in the header at offset 0 that `plan` is in progress (checkpoint kind = the
/// operation, `extra.journal` = the plan id, `extra.mac` under the volume key).
fn mark_busy(dev: &dyn Backend, plan: &Plan, key: &VolumeKey) -> Result<(), MigrateError> {
    let loaded = store::load(dev)?;
    let mut h = loaded.header.clone();
    let mut c = Checkpoint { kind: plan.op.name().into(), offset: 0, extra: Default::default() };
    c.extra.insert("journal".into(), hex::encode(plan.id));
    let tag = checkpoint_mac(key, &h, &c);
    c.extra.insert("mac".into(), tag);
    h.checkpoint = Some(c);
    store::update(dev, &loaded, &mut h)?;
    Ok(())
}

/// Where `done` starts: nothing is in the new layout yet.
fn initial_done(plan: &Plan) -> u64 {
    if backwards(plan) {
        plan.data_len
    } else {
        0
    }
}

/// Encrypt moves data towards the end, so it goes from the last chunk to the first: each
/// chunk's destination then only overlaps sources that are already moved.
fn backwards(plan: &Plan) -> bool {
    plan.new_offset > plan.old_offset
}

/// The next chunk to process after `done`, as a data range `[a, b)`.
fn next_chunk(plan: &Plan, done: u64) -> Option<(u64, u64)> {
    if backwards(plan) {
        if done == 0 {
            return None;
        }
        let a = (done - 1) / plan.chunk * plan.chunk;
        Some((a, done))
    } else {
        if done >= plan.data_len {
            return None;
        }
        Some((done, (done + plan.chunk).min(plan.data_len)))
    }
}

/// Checks the plan's geometry before anything is written or resumed: chunk bounds, the data
/// staying clear of the journal, the shift being at least one chunk.
pub fn check_plan(plan: &Plan, device_size: u64) -> Result<(), MigrateError> {
    let bad = |m: String| Err(MigrateError::Invalid(m));
    let ss = plan.sector_size;
    if plan.chunk == 0 || !ss.is_aligned(plan.chunk) || !ss.is_aligned(plan.data_len) || plan.data_len == 0 {
        return bad(format!("chunk {} or length {} is not a positive multiple of {ss}", plan.chunk, plan.data_len));
    }
    if plan.device_size != device_size {
        return bad(format!(
            "the device is {device_size} bytes but the operation started on {} bytes: it was resized",
            plan.device_size
        ));
    }
    let Some(jstart) = super::journal::journal_start(device_size) else {
        return bad("the device is too small for a journal".into());
    };
    let end = plan.old_offset.max(plan.new_offset).checked_add(plan.data_len);
    if end.is_none_or(|e| e > jstart) {
        return bad(format!(
            "the data ({} bytes at offsets {} and {}) runs into the journal at {jstart}",
            plan.data_len, plan.old_offset, plan.new_offset
        ));
    }
    let shift = plan.new_offset.abs_diff(plan.old_offset);
    match plan.op {
        Op::Reencrypt if shift != 0 || plan.chunk > BACKUP_LEN => bad("reencrypt chunk or offsets invalid".into()),
        Op::Encrypt | Op::Decrypt if shift < plan.chunk => {
            bad(format!("the shift {shift} is smaller than the chunk {}", plan.chunk))
        }
        _ => Ok(()),
    }
}

/// Resumes (or continues) an operation from its latest record.
pub fn run(
    dev: &dyn Backend,
    journal: Journal,
    plan: &Plan,
    keys: &Keys,
    rec: Record,
    progress: Progress<'_>,
) -> Result<(), MigrateError> {
    check_plan(plan, dev.size())?;
    let guard = keys.guard(plan.op).ok_or_else(|| MigrateError::Invalid("missing key".into()))?;
    let digest = plan.digest()?;
    let cipher = |k: &Option<VolumeKey>, zero_sectors: bool| -> Result<Option<SectorCipher>, MigrateError> {
        k.as_ref()
            .map(|k| SectorCipher::new(k, plan.sector_size).map(|c| c.with_zero_sectors(zero_sectors)))
            .transpose()
            .map_err(MigrateError::from)
    };
    // A sparse volume's never-written sectors are raw zeros that stand for plaintext zeros:
    // reading the old data honours the old header's flag. New ciphertext is all real.
    let old =
        if plan.op == Op::Encrypt { None } else { cipher(&keys.old, decode_image(&plan.old_image)?.zero_sectors)? };
    let new = if plan.op == Op::Decrypt { None } else { cipher(&keys.new, false)? };
    let mut w = Worker { dev, journal, plan, digest, guard, old, new, seq: rec.seq };
    if rec.complete {
        return journal.wipe(dev);
    }
    let mut done = rec.done;
    let total = plan.data_len;
    let processed = |d: u64| if backwards(plan) { total - d } else { d };
    progress(processed(done));
    match plan.op {
        Op::Encrypt | Op::Decrypt => {
            while let Some((a, b)) = next_chunk(plan, done) {
                w.shift_chunk(a, b)?;
                done = if backwards(plan) { a } else { b };
                w.record(done, false, None)?;
                progress(processed(done));
            }
        }
        Op::Reencrypt => {
            if let Some(inf) = &rec.inflight {
                if w.redo_from_backup(inf, rec.seq)? {
                    done = inf.start + inf.len;
                }
            }
            while let Some((a, b)) = next_chunk(plan, done) {
                w.reencrypt_chunk(a, b)?;
                done = b;
                progress(processed(done));
            }
            w.record(done, false, None)?;
        }
    }
    w.finalize()
}

struct Worker<'a> {
    dev: &'a dyn Backend,
    journal: Journal,
    plan: &'a Plan,
    digest: [u8; 32],
    guard: &'a VolumeKey,
    old: Option<SectorCipher>,
    new: Option<SectorCipher>,
    seq: u64,
}

impl Worker<'_> {
    fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> MigrateError {
        MigrateError::io(what)
    }

    /// Writes the next record and flushes: after this returns, the record is durable.
    fn record(&mut self, done: u64, complete: bool, inflight: Option<Inflight>) -> Result<(), MigrateError> {
        self.write_record(done, complete, inflight)?;
        self.dev.flush().map_err(self.io("flushing the journal"))
    }

    fn write_record(&mut self, done: u64, complete: bool, inflight: Option<Inflight>) -> Result<(), MigrateError> {
        self.seq = self.seq.checked_add(1).ok_or_else(|| MigrateError::Invalid("journal sequence exhausted".into()))?;
        let rec = Record { seq: self.seq, done, complete, inflight };
        self.journal.write_record(self.dev, self.plan, &self.digest, self.guard, &rec)
    }

    /// Old ciphertext (or plaintext) of `buf` at data offset `a` to new, in place.
    fn transform(&self, a: u64, buf: &mut [u8]) -> Result<(), MigrateError> {
        let first = self.plan.sector_size.sector_of(a);
        if let Some(c) = &self.old {
            c.decrypt(first, buf)?;
        }
        if let Some(c) = &self.new {
            c.encrypt(first, buf)?;
        }
        Ok(())
    }

    /// Datashift step for `[a, b)`: read from the old place, transform, write to the new place,
    /// flush. The destination never overlaps this chunk's source (the shift is at least one
    /// chunk) and only overlaps sources that the durable record already counts as moved, so
    /// a crash anywhere in here is repaired by doing the chunk again.
    fn shift_chunk(&self, a: u64, b: u64) -> Result<(), MigrateError> {
        let mut buf = vec![0u8; (b - a) as usize];
        self.dev.read_at(&mut buf, self.plan.old_offset + a).map_err(self.io("reading data"))?;
        self.transform(a, &mut buf)?;
        self.dev.write_at(&buf, self.plan.new_offset + a).map_err(self.io("writing data"))?;
        self.dev.flush().map_err(self.io("flushing data"))
    }

    /// Re-encryption step for `[a, b)`: back up the old ciphertext into the backup slot of the
    /// next record, write that record (in flight: this chunk, with the backup's hash), flush;
    /// only then overwrite the chunk in place, flush.
    fn reencrypt_chunk(&mut self, a: u64, b: u64) -> Result<(), MigrateError> {
        let mut buf = vec![0u8; (b - a) as usize];
        let at = self.plan.old_offset + a;
        self.dev.read_at(&mut buf, at).map_err(self.io("reading data"))?;
        let slot = self.seq + 1;
        self.dev.write_at(&buf, self.journal.backup_at(slot)).map_err(self.io("writing the backup"))?;
        let inflight = Inflight { start: a, len: b - a, sha256: sha256(&buf) };
        self.record(a, false, Some(inflight))?;
        self.transform(a, &mut buf)?;
        self.dev.write_at(&buf, at).map_err(self.io("writing data"))?;
        self.dev.flush().map_err(self.io("flushing data"))
    }

    /// After a crash with a chunk in flight: if its backup is intact, the chunk on disk may be
    /// anything between old and new, so it is rebuilt from the backup; if the backup is not
    /// intact, the crash came before the record's flush, hence before the chunk was touched.
    /// Returns whether the chunk was rebuilt.
    fn redo_from_backup(&self, inf: &Inflight, seq: u64) -> Result<bool, MigrateError> {
        if inf.len > BACKUP_LEN || inf.start.checked_add(inf.len).is_none_or(|e| e > self.plan.data_len) {
            return Err(MigrateError::Invalid("journal record has an impossible chunk".into()));
        }
        let mut buf = vec![0u8; inf.len as usize];
        self.dev.read_at(&mut buf, self.journal.backup_at(seq)).map_err(self.io("reading the backup"))?;
        if sha256(&buf) != inf.sha256 {
            return Ok(false);
        }
        self.transform(inf.start, &mut buf)?;
        self.dev.write_at(&buf, self.plan.old_offset + inf.start).map_err(self.io("writing data"))?;
        self.dev.flush().map_err(self.io("flushing data"))?;
        Ok(true)
    }

    /// Every chunk is in the new layout: write the final header (encrypt: a new header at
    /// offset 0; reencrypt: the new-key header as the next version; decrypt: none), record
    /// completion, wipe the journal. Each step is idempotent, so a crash anywhere here is
    /// finished by running it again.
    fn finalize(&mut self) -> Result<(), MigrateError> {
        match self.plan.op {
            Op::Encrypt => {
                let mut h = decode_image(&self.plan.new_image)?;
                h.checkpoint = None;
                store::write_new(self.dev, &mut h)?;
            }
            Op::Reencrypt => {
                let mut h: Header = decode_image(&self.plan.new_image)?;
                h.checkpoint = None;
                let loaded = store::load(self.dev)?;
                store::update(self.dev, &loaded, &mut h)?;
            }
            Op::Decrypt => {}
        }
        let done = if backwards(self.plan) { 0 } else { self.plan.data_len };
        self.record(done, true, None)?;
        self.journal.wipe(self.dev)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fault::{CrashBackend, CrashMode};
    use super::super::journal::{header_image, journal_start, JOURNAL_LEN};
    use super::*;
    use crate::backend::MemBackend;
    use crate::header::tests::key;
    use crate::header::DEFAULT_DATA_OFFSET;
    use crate::units::SectorSize;

    const S: u64 = DEFAULT_DATA_OFFSET;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn header_for(k: &VolumeKey, len: u64, ss: SectorSize) -> Header {
        let mut h = Header::new(uuid::Uuid::from_bytes([3; 16]), ss, S, len, None, k).unwrap();
        h.slots.push(crate::header::KeySlot {
            id: 0,
            provider: "local".into(),
            key_id: "kek:test".into(),
            wrapped: vec![1; 92],
            context: Default::default(),
            created: 0,
        });
        h
    }

    struct Case {
        op: Op,
        ss: SectorSize,
        len: u64,
        chunk: u64,
    }

    fn device_size(c: &Case) -> u64 {
        S + c.len + JOURNAL_LEN + 8192
    }

    fn plan(c: &Case, old: &Header, new: &Header) -> Plan {
        let (old_offset, new_offset) = match c.op {
            Op::Encrypt => (0, S),
            Op::Decrypt => (S, 0),
            Op::Reencrypt => (S, S),
        };
        Plan {
            op: c.op,
            id: [9; 16],
            sector_size: c.ss,
            device_size: device_size(c),
            data_len: c.len,
            old_offset,
            new_offset,
            chunk: c.chunk,
            old_image: if c.op == Op::Encrypt { Vec::new() } else { header_image(old).unwrap() },
            new_image: if c.op == Op::Decrypt { Vec::new() } else { header_image(new).unwrap() },
        }
    }

    /// A device in the state before `c.op`, the plaintext it holds, and the keys.
    fn setup(c: &Case) -> (MemBackend, Vec<u8>, Header, Header) {
        let dev = MemBackend::new(device_size(c) as usize);
        let plain = data(c.len as usize, 42);
        let (ko, kn) = (key(1), key(2));
        let old = header_for(&ko, c.len, c.ss);
        let new = header_for(&kn, c.len, c.ss);
        match c.op {
            Op::Encrypt => dev.write_at(&plain, 0).unwrap(),
            Op::Decrypt | Op::Reencrypt => {
                let mut h = old.clone();
                store::write_new(&dev, &mut h).unwrap();
                let mut ct = plain.clone();
                SectorCipher::new(&ko, c.ss).unwrap().encrypt(c.ss.sector_of(0), &mut ct).unwrap();
                dev.write_at(&ct, S).unwrap();
            }
        }
        (dev, plain, old, new)
    }

    fn keys(op: Op) -> Keys {
        Keys { old: (op != Op::Encrypt).then(|| key(1)), new: (op != Op::Decrypt).then(|| key(2)) }
    }

    /// What a resumed command does: find the journal and its latest record and run; without a
    /// journal, either the operation finished (its wipe had begun) or it had not started.
    fn resume(dev: &dyn Backend, c: &Case, p: &Plan) -> Result<(), MigrateError> {
        let j = Journal::of(dev).unwrap();
        let k = keys(c.op);
        let Some(plan) = j.read_plan(dev)? else {
            let finished = match (c.op, store::load(dev)) {
                (Op::Encrypt, Ok(_)) => true,
                (Op::Decrypt, Err(_)) => true,
                (Op::Reencrypt, Ok(l)) => l.header.key_matches(&key(2)),
                _ => false,
            };
            if !finished {
                start(dev, p, &k, &mut |_| {})?;
            }
            return Ok(());
        };
        let Some(rec) = j.latest(dev, &plan, k.guard(plan.op).unwrap())? else {
            // Plan written, first record not durable: nothing was touched; start over.
            return start(dev, &plan, &k, &mut |_| {});
        };
        run(dev, j, &plan, &k, rec, &mut |_| {})
    }

    fn check_result(dev: &dyn Backend, c: &Case, plain: &[u8]) {
        let mut got = vec![0u8; c.len as usize];
        match c.op {
            Op::Decrypt => dev.read_at(&mut got, 0).unwrap(),
            Op::Encrypt | Op::Reencrypt => {
                let loaded = store::load(dev).unwrap();
                assert!(loaded.header.checkpoint.is_none());
                let k = key(2);
                loaded.header.check_key(&k).unwrap();
                loaded.header.verify_mac(&k).unwrap();
                dev.read_at(&mut got, S).unwrap();
                SectorCipher::new(&k, c.ss).unwrap().decrypt(c.ss.sector_of(0), &mut got).unwrap();
            }
        }
        assert!(got == plain, "data differs after {:?}", c.op);
        let j = Journal::of(dev).unwrap();
        assert!(j.read_plan(dev).unwrap().is_none(), "journal not wiped");
    }

    fn uninterrupted(c: &Case) {
        let (dev, plain, old, new) = setup(c);
        start(&dev, &plan(c, &old, &new), &keys(c.op), &mut |_| {}).unwrap();
        check_result(&dev, c, &plain);
    }

    #[test]
    fn encrypt_decrypt_reencrypt_complete_without_crash() {
        for op in [Op::Encrypt, Op::Decrypt, Op::Reencrypt] {
            for ss in [SectorSize::S512, SectorSize::S4096] {
                uninterrupted(&Case { op, ss, len: (3 << 20) + 8192, chunk: 1 << 20 });
            }
        }
    }

    /// Crashes after every single write (and, with `PowerCut`, loses or tears whatever was not
    /// flushed), resumes, and checks the result: the exhaustive fault-point test.
    fn crash_everywhere(c: &Case, mode: CrashMode) {
        let (dev0, plain, old, new) = setup(c);
        let p = plan(c, &old, &new);
        // Count the writes of an uninterrupted run.
        let probe = CrashBackend::new(u64::MAX, mode, 0);
        probe.load(&dev0.snapshot());
        start(&probe, &p, &keys(c.op), &mut |_| {}).unwrap();
        let writes = probe.writes();
        assert!(writes > 10);
        for n in 0..writes {
            let dev = CrashBackend::new(n, mode, n);
            dev.load(&dev0.snapshot());
            let r = start(&dev, &p, &keys(c.op), &mut |_| {});
            assert!(r.is_err(), "crash point {n} did not crash");
            dev.crash();
            // Resume, possibly crashing again once more on a later write.
            let again = dev.rearm(n / 2 + 3);
            let r = resume(&dev, c, &p);
            if again && r.is_err() {
                dev.crash();
                dev.disarm();
                resume(&dev, c, &p).unwrap();
            } else {
                r.unwrap_or_else(|e| panic!("crash point {n}: resume failed: {e}"));
            }
            check_result(&dev, c, &plain);
        }
        eprintln!("{:?} {mode:?}: {writes} crash points, all recovered", c.op);
    }

    #[test]
    fn encrypt_survives_a_crash_at_every_write() {
        let c = Case { op: Op::Encrypt, ss: SectorSize::S4096, len: (2 << 20) + 3 * 4096, chunk: 512 << 10 };
        crash_everywhere(&c, CrashMode::Clean);
        crash_everywhere(&c, CrashMode::PowerCut);
    }

    #[test]
    fn decrypt_survives_a_crash_at_every_write() {
        let c = Case { op: Op::Decrypt, ss: SectorSize::S512, len: (2 << 20) + 512, chunk: 512 << 10 };
        crash_everywhere(&c, CrashMode::Clean);
        crash_everywhere(&c, CrashMode::PowerCut);
    }

    #[test]
    fn reencrypt_survives_a_crash_at_every_write() {
        let c = Case { op: Op::Reencrypt, ss: SectorSize::S4096, len: (2 << 20) + 4096, chunk: 512 << 10 };
        crash_everywhere(&c, CrashMode::Clean);
        crash_everywhere(&c, CrashMode::PowerCut);
    }

    #[test]
    fn a_resized_device_is_refused() {
        let c = Case { op: Op::Reencrypt, ss: SectorSize::S4096, len: 1 << 20, chunk: 1 << 20 };
        let (_, _, old, new) = setup(&c);
        let p = plan(&c, &old, &new);
        assert!(check_plan(&p, p.device_size + 4096).is_err());
        assert!(journal_start(p.device_size).is_some());
    }
}
