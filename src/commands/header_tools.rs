//! `nbdcrypt header backup|restore|repair`.
//!
//! A backup is the loaded header encoded as a primary copy area (1 MiB, `store::backup_bytes`):
//! it holds wrapped keys only, but restoring it brings back every slot it held, including any
//! removed since (a revoked recovery key, a KMS key rotated away). Restore therefore checks the
//! backup is this volume's (same uuid), says which slots come back and which go, and asks.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{confirm, io_err, keyslot, CmdError};
use crate::backend::{Backend, FileBackend};
use crate::cli::HeaderCommand;
use crate::header::{store, Header, HeaderError, KeySlot, COPY_AREA};

pub(super) async fn run(cmd: HeaderCommand) -> Result<(), CmdError> {
    match cmd {
        HeaderCommand::Backup { device, file } => backup(&device, &file),
        HeaderCommand::Restore { file, device, yes } => restore(&file, &device, yes),
        HeaderCommand::Repair { device } => repair(&device),
    }
}

fn open(device: &Path, writable: bool) -> Result<FileBackend, CmdError> {
    FileBackend::open(device, writable).map_err(io_err(format!("cannot open {}", device.display())))
}

fn backup(device: &Path, file: &Path) -> Result<(), CmdError> {
    let dev = open(device, false)?;
    let loaded = store::load(&dev)?;
    if loaded.is_degraded() {
        tracing::warn!(primary = ?loaded.primary, secondary = ?loaded.secondary, "one header copy is damaged or stale; backing up the valid one (run `nbdcrypt header repair`)");
    }
    let bytes = store::backup_bytes(&loaded)?;
    let what = format!("cannot write {}", file.display());
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CmdError::Refused(format!("{} already exists; a header backup is never overwritten", file.display()))
        } else {
            CmdError::Io { what: what.clone(), source: e }
        }
    })?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io_err(what))?;
    // Make the new directory entry durable too, so the backup survives a crash right after.
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let h = &loaded.header;
    println!(
        "backed up the header of {} (volume {}, sequence {}, {} key slot(s)) to {} (mode 0600)",
        device.display(),
        h.uuid,
        h.seq,
        h.slots.len(),
        file.display()
    );
    Ok(())
}

/// Reads a backup file: exactly one copy area, checked before it is read.
fn read_backup_file(file: &Path) -> Result<Header, CmdError> {
    let what = format!("cannot read {}", file.display());
    let f = std::fs::File::open(file).map_err(io_err(what.clone()))?;
    let len = f.metadata().map_err(io_err(what.clone()))?.len();
    if len != COPY_AREA {
        return Err(CmdError::Usage(format!(
            "{} is {len} bytes; a header backup is exactly {COPY_AREA} bytes",
            file.display()
        )));
    }
    let mut bytes = Vec::with_capacity(COPY_AREA as usize);
    f.take(COPY_AREA).read_to_end(&mut bytes).map_err(io_err(what))?;
    Ok(store::read_backup(&bytes)?)
}

fn restore(file: &Path, device: &Path, yes: bool) -> Result<(), CmdError> {
    let mut backup = read_backup_file(file)?;
    let _lock = super::lock_header(device)?;
    let dev = open(device, true)?;
    let needed = backup.data_end().unwrap_or(u64::MAX);
    if needed > dev.size() {
        return Err(CmdError::Refused(format!(
            "the backup describes {needed} bytes but {} holds {}; it is not this volume's header",
            device.display(),
            dev.size()
        )));
    }
    let current = match store::load(&dev) {
        Ok(l) => Some(l),
        Err(HeaderError::Io(e)) => return Err(CmdError::Header(HeaderError::Io(e))),
        Err(e) => {
            tracing::warn!(error = %crate::logging::error_chain(&e), "the device's header cannot be read; restoring over it");
            None
        }
    };
    let device_uuid = match &current {
        Some(l) => Some(l.header.uuid),
        None => store::peek_uuid(&dev)?,
    };
    match device_uuid {
        Some(u) if u != backup.uuid => {
            return Err(CmdError::Refused(format!(
                "the backup is the header of volume {} but {} holds volume {u}; restoring it would make the data unreadable",
                backup.uuid,
                device.display()
            )));
        }
        Some(_) => {}
        None => eprintln!(
            "warning: {} has no recognisable nbdcrypt header, so the backup's volume uuid {} cannot be checked against it",
            device.display(),
            backup.uuid
        ),
    }
    let now: &[KeySlot] = current.as_ref().map(|l| l.header.slots.as_slice()).unwrap_or(&[]);
    let revived: Vec<_> = backup.slots.iter().filter(|s| !now.contains(s)).collect();
    let lost: Vec<_> = now.iter().filter(|s| !backup.slots.contains(s)).collect();
    eprintln!(
        "warning: restoring revives every key slot the backup holds; a slot removed since the backup (a revoked or rotated key) opens the volume again:"
    );
    for s in &backup.slots {
        let mark = if revived.contains(&s) { " (not in the current header: comes back)" } else { "" };
        eprintln!("  {}{mark}", keyslot::describe(s));
    }
    for s in &lost {
        eprintln!("  {} (in the current header: will be gone)", keyslot::describe(s));
    }
    confirm(
        &format!("restore the header of volume {} from {} onto {}", backup.uuid, file.display(), device.display()),
        yes,
    )?;
    match &current {
        Some(l) => store::update(&dev, l, &mut backup)?,
        None => store::write_new(&dev, &mut backup)?,
    }
    println!(
        "restored the header of volume {} onto {} (sequence {}, {} key slot(s))",
        backup.uuid,
        device.display(),
        backup.seq,
        backup.slots.len()
    );
    Ok(())
}

fn repair(device: &Path) -> Result<(), CmdError> {
    let _lock = super::lock_header(device)?;
    let dev = open(device, true)?;
    let loaded = store::load(&dev)?;
    let seq = loaded.header.seq;
    match store::repair(&dev, &loaded)? {
        Some(which) => println!(
            "rewrote the {which} header copy of {} from the {} copy (sequence {seq})",
            device.display(),
            loaded.source()
        ),
        None => println!("both header copies of {} are valid (sequence {seq}); nothing to repair", device.display()),
    }
    Ok(())
}
