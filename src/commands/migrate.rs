//! `nbdcrypt migrate`, `encrypt`, `reencrypt`, `decrypt`: the command-line side of
//! [`crate::migrate`]: take the device exclusively, find out whether this is a fresh start or a
//! resume (the target's checkpoint, or the tail journal), unwrap the keys with the providers
//! given, and hand over to the synchronous engines.

use std::path::Path;

use super::format::{build_header, looks_used};
use super::{provider_for, CmdError};
use crate::backend::{Backend, FileBackend};
use crate::cli::{DecryptArgs, EncryptArgs, KmsArgs, MigrateArgs, ReencryptArgs};
use crate::crypto::VolumeKey;
use crate::header::{store, Header, HeaderError, KeySlot, DEFAULT_DATA_OFFSET};
use crate::keys::{self, KeyProvider, Keyring};
use crate::migrate::inplace::{self, Keys};
use crate::migrate::journal::{decode_image, header_image, Journal, Op, Plan, BACKUP_LEN, JOURNAL_LEN};
use crate::migrate::progress::Progress;
use crate::migrate::{copy, fault, lock_device, source, MigrateError};
use crate::units::SectorSize;
use crate::volume;

/// Opens the device read-write, behind the fault injector when the crash tests ask for it.
fn open_rw(path: &Path) -> Result<Box<dyn Backend>, CmdError> {
    let b = FileBackend::open(path, true).map_err(MigrateError::io(format!("cannot open {}", path.display())))?;
    Ok(match fault::kill_limit_from_env() {
        Some(n) => Box::new(fault::KillAfterWrites::new(Box::new(b), n)),
        None => Box::new(b),
    })
}

/// Unwraps `h`'s key with `keys` and checks the key digest and the header MAC.
async fn unlock(h: &Header, keys: &Keyring) -> Result<VolumeKey, CmdError> {
    let (key, _slot) = volume::unlock(h, keys).await?;
    h.verify_mac(&key).map_err(volume::VolumeError::Tampered)?;
    Ok(key)
}

/// The keys that may unlock: the `--key` provider, plus KMS for any `aws-kms` slot (which
/// names its own key ARN).
fn ring(provider: Box<dyn KeyProvider>, kms: &KmsArgs) -> Result<Keyring, CmdError> {
    let mut r = super::keyring(&[], kms)?;
    r.add(provider);
    Ok(r)
}

fn sector(bytes: u32) -> Result<SectorSize, CmdError> {
    SectorSize::new(bytes).ok_or_else(|| CmdError::Usage("--sector-size must be 512 or 4096".into()))
}

/// Chunk of the datashift operations: the shift (2 MiB), or less for tests
/// (`NBDCRYPT_CHUNK_KIB`).
fn chunk(max: u64, ss: SectorSize) -> u64 {
    let c = std::env::var("NBDCRYPT_CHUNK_KIB").ok().and_then(|v| v.parse::<u64>().ok()).map(|k| k << 10);
    ss.align_down(c.unwrap_or(max).clamp(ss.bytes_u64(), max))
}

fn random_id() -> Result<[u8; 16], CmdError> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut id = [0u8; 16];
    SystemRandom::new().fill(&mut id).map_err(|_| crate::keys::KeyError::Random)?;
    Ok(id)
}

// ---- migrate ---------------------------------------------------------------------------------

pub(super) async fn migrate(args: MigrateArgs) -> Result<(), CmdError> {
    let ss = sector(args.sector_size)?;
    let provider = provider_for(&args.key, &args.kms).await?;
    let new_provider = provider_for(&args.key, &args.kms).await?;
    let mut src =
        source::open(&args.from).map_err(MigrateError::io(format!("cannot open the source {}", args.from)))?;
    let size = src.size();
    if size == 0 {
        return Err(CmdError::Usage(format!("the source {} is empty", args.from)));
    }
    warn_if_source_in_use(&args.from);
    let fp = source::fingerprint(src.as_mut()).map_err(MigrateError::io("reading the source"))?;
    let _lock = lock_device(&args.to)?;
    let dev = open_rw(&args.to)?;
    let keys = ring(provider, &args.kms)?;
    let every = std::env::var("NBDCRYPT_CHECKPOINT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(copy::DEFAULT_CHECKPOINT, |m| (m << 20).max(1 << 20));

    let mut resume = None;
    match store::load(dev.as_ref()) {
        Ok(loaded) => {
            let h = &loaded.header;
            let key = unlock(h, &keys).await;
            match (&h.checkpoint, key) {
                (Some(c), Ok(key)) if c.kind == copy::KIND => match copy::resume_offset(&key, h, size, &fp) {
                    Ok(off) => resume = Some((key, off)),
                    Err(e) if !args.yes => return Err(e.into()),
                    Err(_) => {}
                },
                (None, Ok(key)) if args.verify && !args.yes => {
                    tracing::info!("the target is a complete nbdcrypt volume; verifying it against the source");
                    copy::verify(src.as_mut(), dev.as_ref(), h, &key)?;
                    println!("verified {}: identical to {}", args.to.display(), args.from);
                    return Ok(());
                }
                _ if args.yes => {}
                (Some(c), _) => {
                    return Err(MigrateError::Refused(format!(
                        "{} has an nbdcrypt header with an unfinished {} (use --yes to start over)",
                        args.to.display(),
                        c.kind
                    ))
                    .into())
                }
                (None, _) => {
                    return Err(MigrateError::Refused(format!(
                        "{} already holds a complete nbdcrypt volume (--verify checks it against the source; \
                         --yes migrates again from scratch)",
                        args.to.display()
                    ))
                    .into())
                }
            }
        }
        Err(HeaderError::NotFound) => {
            if !args.yes {
                if let Some(why) = looks_used(dev.as_ref())? {
                    return Err(CmdError::Refused(format!(
                        "{} looks like it holds data: {why} (use --yes)",
                        args.to.display()
                    )));
                }
            }
        }
        Err(e) if !args.yes => return Err(e.into()),
        Err(_) => {}
    }

    let (key, from) = match resume {
        Some((key, off)) => {
            tracing::info!(offset = off, "resuming the migration");
            (key, off)
        }
        None => {
            let data_size = ss.align_up(size).ok_or_else(|| CmdError::Usage("source too large".into()))?;
            let needed = DEFAULT_DATA_OFFSET + data_size;
            if dev.size() < needed {
                return Err(CmdError::Usage(format!(
                    "the target is {} bytes; it must hold at least {needed} (the source plus 2 MiB of header{})",
                    dev.size(),
                    ", better 5 MiB more so that reencrypt/decrypt can run in place later"
                )));
            }
            if dev.size() < needed + JOURNAL_LEN {
                tracing::warn!(
                    "the target has less than {} bytes past the data area: a later in-place reencrypt or decrypt \
                     will need the device grown first",
                    JOURNAL_LEN
                );
            }
            let (mut h, key) =
                build_header(new_provider.as_ref(), ss, Vec::new(), None, DEFAULT_DATA_OFFSET, data_size).await?;
            h.zero_sectors = !args.no_sparse;
            h.reseal(&key);
            h.checkpoint = Some(copy::checkpoint(&key, &h, 0, size, &fp));
            store::write_new(dev.as_ref(), &mut h)?;
            tracing::info!(uuid = %h.uuid, data_size, "formatted the target");
            (key, 0)
        }
    };
    let mut progress = Progress::new("migrate", size);
    copy::copy(src.as_mut(), dev.as_ref(), &key, from, every, &mut progress)?;
    let h = store::load(dev.as_ref())?.header;
    if args.verify {
        copy::verify(src.as_mut(), dev.as_ref(), &h, &key)?;
    }
    println!(
        "migrated {} ({size} bytes) to {}: uuid {}, data {} bytes at offset {}{}",
        src.describe(),
        args.to.display(),
        h.uuid,
        h.data_size,
        h.data_offset,
        if args.verify { ", verified" } else { "" }
    );
    Ok(())
}

/// A mounted (or otherwise held) block device as source is allowed, but only consistent if
/// nothing writes to it: say so.
fn warn_if_source_in_use(spec: &str) {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let p = Path::new(spec);
    let is_block = std::fs::metadata(p).map(|m| m.file_type().is_block_device()).unwrap_or(false);
    if !is_block {
        return;
    }
    let held =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(p).err().and_then(|e| e.raw_os_error());
    if held == Some(libc::EBUSY) {
        tracing::warn!(
            source = spec,
            "the source is mounted or in use: the copy is only consistent if nothing writes to it \
             (unmount it, or migrate from a snapshot); a resumed run refuses a source that changed"
        );
    }
}

// ---- in-place: shared ------------------------------------------------------------------------

/// Resumes the unfinished operation recorded in the journal, if any. `Ok(None)`: no journal.
async fn resume_journal(dev: &dyn Backend, want: Op, old: &Keyring, new: &Keyring) -> Result<Option<()>, CmdError> {
    let Some(journal) = Journal::of(dev) else { return Ok(None) };
    let Some(plan) = journal.read_plan(dev)? else { return Ok(None) };
    if plan.op != want {
        return Err(MigrateError::Refused(format!(
            "an unfinished {} is recorded on this device; finish it first with `nbdcrypt {}`",
            plan.op.name(),
            plan.op.name()
        ))
        .into());
    }
    let mut keys = Keys::default();
    if !plan.old_image.is_empty() {
        keys.old = Some(unlock(&decode_image(&plan.old_image)?, old).await?);
    }
    if !plan.new_image.is_empty() {
        keys.new = Some(unlock(&decode_image(&plan.new_image)?, new).await?);
    }
    inplace::check_plan(&plan, dev.size())?;
    let guard = keys.guard(plan.op).ok_or_else(|| CmdError::Usage("the journal holds no key".into()))?;
    let rec = journal.latest(dev, &plan, guard)?;
    tracing::info!(op = plan.op.name(), done = rec.as_ref().map(|r| r.done), "resuming from the journal");
    let mut progress = Progress::new(plan.op.name(), plan.data_len);
    let mut cb = |d: u64| {
        progress.update(d);
        fault::throttle();
    };
    match rec {
        // The plan is durable but its first record is not: nothing was touched yet.
        None => inplace::start(dev, &plan, &keys, &mut cb)?,
        Some(rec) => inplace::run(dev, journal, &plan, &keys, rec, &mut cb)?,
    }
    progress.finish(plan.data_len);
    Ok(Some(()))
}

fn run_new(dev: &dyn Backend, plan: &Plan, keys: &Keys) -> Result<(), CmdError> {
    inplace::check_plan(plan, dev.size())?;
    let mut progress = Progress::new(plan.op.name(), plan.data_len);
    let mut cb = |d: u64| {
        progress.update(d);
        fault::throttle();
    };
    inplace::start(dev, plan, keys, &mut cb)?;
    progress.finish(plan.data_len);
    Ok(())
}

/// The size a filesystem at the start of `dev` says it has, if it is one we recognise
/// (ext2/3/4, XFS).
fn filesystem_size(dev: &dyn Backend) -> Result<Option<(String, u64)>, CmdError> {
    let mut sb = vec![0u8; 4096];
    if dev.size() < 4096 {
        return Ok(None);
    }
    dev.read_at(&mut sb, 0).map_err(MigrateError::io("reading the device"))?;
    let le32 = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    if sb[1080..1082] == [0x53, 0xef] {
        let log = le32(1024 + 24);
        let block = 1024u64 << log.min(16);
        let incompat = le32(1024 + 0x60);
        let hi = if incompat & 0x80 != 0 { le32(1024 + 0x150) } else { 0 };
        let blocks = (hi << 32) | le32(1024 + 4);
        return Ok(Some(("ext4".into(), blocks.saturating_mul(block))));
    }
    if &sb[0..4] == b"XFSB" {
        let bs = u64::from(u32::from_be_bytes([sb[4], sb[5], sb[6], sb[7]]));
        let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap_or([0; 8]));
        return Ok(Some(("xfs".into(), blocks.saturating_mul(bs))));
    }
    Ok(None)
}

// ---- encrypt ---------------------------------------------------------------------------------

pub(super) async fn encrypt(args: EncryptArgs) -> Result<(), CmdError> {
    let ss = sector(args.sector_size)?;
    let provider = provider_for(&args.key, &args.kms).await?;
    let keys = ring(provider_for(&args.key, &args.kms).await?, &args.kms)?;
    let _lock = lock_device(&args.device)?;
    let dev = open_rw(&args.device)?;
    if resume_journal(dev.as_ref(), Op::Encrypt, &keys, &keys).await?.is_some() {
        println!("encrypted {} (resumed and completed)", args.device.display());
        return Ok(());
    }
    match store::load(dev.as_ref()) {
        Ok(loaded) => {
            if loaded.header.checkpoint.is_none() && unlock(&loaded.header, &keys).await.is_ok() {
                println!(
                    "{} is already an encrypted nbdcrypt volume (uuid {}): nothing to do",
                    args.device.display(),
                    loaded.header.uuid
                );
                return Ok(());
            }
            return Err(
                MigrateError::Refused(format!("{} already has an nbdcrypt header", args.device.display())).into()
            );
        }
        Err(HeaderError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let journal = Journal::of(dev.as_ref())
        .ok_or_else(|| CmdError::Usage("the device is too small for nbdcrypt encrypt".into()))?;
    let room = ss.align_down(journal.start.saturating_sub(DEFAULT_DATA_OFFSET));
    let data_len = match args.size {
        Some(s) if s > room => {
            return Err(CmdError::Usage(format!(
                "--size {s} does not fit: at most {room} bytes of data fit with the 2 MiB header and the 3 MiB journal"
            )))
        }
        Some(s) if !ss.is_aligned(s) || s == 0 => {
            return Err(CmdError::Usage(format!("--size {s} is not a positive multiple of {ss}")))
        }
        Some(s) => s,
        None => room,
    };
    if data_len == 0 {
        return Err(CmdError::Usage("the device is too small for nbdcrypt encrypt".into()));
    }
    match filesystem_size(dev.as_ref())? {
        Some((kind, fs)) if fs > data_len => {
            return Err(MigrateError::Refused(format!(
                "the {kind} filesystem is {fs} bytes but only {data_len} fit once the 2 MiB header and the 3 MiB \
                 journal are reserved: shrink the filesystem by {} bytes or grow the device",
                fs - data_len
            ))
            .into())
        }
        Some((kind, fs)) => tracing::info!(filesystem = %kind, size = fs, data_len, "filesystem fits"),
        None if !args.yes => {
            return Err(MigrateError::Refused(format!(
                "no ext4 or XFS filesystem recognised at the start of {}: the last {} bytes of the device will be \
                 overwritten; make sure they are unused, then pass --yes",
                args.device.display(),
                dev.size() - data_len
            ))
            .into())
        }
        None => {}
    }
    let (h, key) = build_header(provider.as_ref(), ss, Vec::new(), None, DEFAULT_DATA_OFFSET, data_len).await?;
    let plan = Plan {
        op: Op::Encrypt,
        id: random_id()?,
        sector_size: ss,
        device_size: dev.size(),
        data_len,
        old_offset: 0,
        new_offset: DEFAULT_DATA_OFFSET,
        chunk: chunk(DEFAULT_DATA_OFFSET, ss),
        old_image: Vec::new(),
        new_image: header_image(&h)?,
    };
    run_new(dev.as_ref(), &plan, &Keys { old: None, new: Some(key) })?;
    println!(
        "encrypted {} in place: uuid {}, data {data_len} bytes at offset {DEFAULT_DATA_OFFSET}",
        args.device.display(),
        h.uuid
    );
    Ok(())
}

/// Loads the header for decrypt/reencrypt and checks the room for the journal.
async fn load_for_inplace(dev: &dyn Backend, keys: &Keyring, what: &str) -> Result<(Header, VolumeKey), CmdError> {
    let loaded = store::load(dev)?;
    let h = loaded.header;
    let key = unlock(&h, keys).await?;
    if let Some(c) = &h.checkpoint {
        if c.kind == copy::KIND {
            return Err(
                MigrateError::Refused("the volume is an unfinished migration target; finish it first".into()).into()
            );
        }
        // A decrypt/reencrypt marker without a journal: that run stopped before it wrote its
        // journal, so nothing was touched; start again.
    }
    let Some(jstart) = crate::migrate::journal::journal_start(dev.size()) else {
        return Err(CmdError::Usage("the device is too small".into()));
    };
    let end = h.data_end().unwrap_or(u64::MAX);
    if end > jstart {
        return Err(MigrateError::Invalid(format!(
            "{what} needs a {JOURNAL_LEN}-byte journal after the data area: grow the device by at least {} bytes \
             (truncate -s +{}M for a file, aws ec2 modify-volume for EBS) and rerun",
            end - jstart,
            (end - jstart).div_ceil(1 << 20)
        ))
        .into());
    }
    Ok((h, key))
}

// ---- decrypt ---------------------------------------------------------------------------------

pub(super) async fn decrypt(args: DecryptArgs) -> Result<(), CmdError> {
    let keys = ring(provider_for(&args.key, &args.kms).await?, &args.kms)?;
    let _lock = lock_device(&args.device)?;
    let dev = open_rw(&args.device)?;
    if resume_journal(dev.as_ref(), Op::Decrypt, &keys, &keys).await?.is_some() {
        println!("decrypted {} (resumed and completed)", args.device.display());
        return Ok(());
    }
    if matches!(store::load(dev.as_ref()), Err(HeaderError::NotFound)) {
        return Err(MigrateError::Refused(format!(
            "{} has no nbdcrypt header and no unfinished decrypt: it is not encrypted (or a decrypt already \
             finished)",
            args.device.display()
        ))
        .into());
    }
    let (h, key) = load_for_inplace(dev.as_ref(), &keys, "decrypt").await?;
    let plan = Plan {
        op: Op::Decrypt,
        id: random_id()?,
        sector_size: h.sector_size,
        device_size: dev.size(),
        data_len: h.data_size,
        old_offset: h.data_offset,
        new_offset: 0,
        chunk: chunk(DEFAULT_DATA_OFFSET.min(h.data_offset), h.sector_size),
        old_image: header_image(&h)?,
        new_image: Vec::new(),
    };
    run_new(dev.as_ref(), &plan, &Keys { old: Some(key), new: None })?;
    println!("decrypted {}: {} bytes of plaintext at offset 0", args.device.display(), h.data_size);
    Ok(())
}

// ---- reencrypt -------------------------------------------------------------------------------

pub(super) async fn reencrypt(args: ReencryptArgs) -> Result<(), CmdError> {
    let old = ring(provider_for(&args.key, &args.kms).await?, &args.kms)?;
    let new_spec = args.new_key.as_ref().unwrap_or(&args.key);
    let new_provider = provider_for(new_spec, &args.kms).await?;
    let new = ring(provider_for(new_spec, &args.kms).await?, &args.kms)?;
    let _lock = lock_device(&args.device)?;
    let dev = open_rw(&args.device)?;
    if resume_journal(dev.as_ref(), Op::Reencrypt, &old, &new).await?.is_some() {
        println!("re-encrypted {} (resumed and completed)", args.device.display());
        return Ok(());
    }
    // A run that finished but was stopped while wiping its journal: the header is the new one.
    if let Ok(loaded) = store::load(dev.as_ref()) {
        let h = &loaded.header;
        if h.checkpoint.is_none() && unlock(h, &old).await.is_err() && unlock(h, &new).await.is_ok() {
            println!("{} is already re-encrypted under the new key: nothing to do", args.device.display());
            return Ok(());
        }
    }
    let (h, old_key) = load_for_inplace(dev.as_ref(), &old, "reencrypt").await?;
    let dropped: Vec<String> =
        h.slots.iter().skip(1).map(|s| format!("{} {} {}", s.id, s.provider, s.key_id)).collect();
    if !dropped.is_empty() {
        tracing::warn!(slots = %dropped.join("; "), "slots that wrap the old key are dropped; add them again for the new key");
    }
    let mut ctx = keys::EncryptionContext::new();
    for (k, v) in h.slots.first().map(|s| s.context.clone()).unwrap_or_default() {
        ctx.insert(k, v);
    }
    ctx.insert(keys::CONTEXT_VOLUME.into(), h.uuid.to_string());
    let p = new_provider.as_ref();
    let (new_key, wrapped) = p.generate(&ctx).await?;
    let mut nh = Header::new(h.uuid, h.sector_size, h.data_offset, h.data_size, h.binding.clone(), &new_key)?;
    nh.slots.push(KeySlot {
        id: 0,
        provider: p.kind().into(),
        key_id: wrapped.key_id,
        wrapped: wrapped.ciphertext,
        context: ctx,
        created: super::now_secs(),
    });
    let mut oh = h.clone();
    oh.checkpoint = None;
    let plan = Plan {
        op: Op::Reencrypt,
        id: random_id()?,
        sector_size: h.sector_size,
        device_size: dev.size(),
        data_len: h.data_size,
        old_offset: h.data_offset,
        new_offset: h.data_offset,
        chunk: chunk(BACKUP_LEN, h.sector_size),
        old_image: header_image(&oh)?,
        new_image: header_image(&nh)?,
    };
    run_new(dev.as_ref(), &plan, &Keys { old: Some(old_key), new: Some(new_key) })?;
    println!(
        "re-encrypted {} under a new volume key: uuid {} kept, slot 0 = {} {}",
        args.device.display(),
        nh.uuid,
        nh.slots[0].provider,
        nh.slots[0].key_id
    );
    Ok(())
}
