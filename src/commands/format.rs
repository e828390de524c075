//! `nbdcrypt format`: refuse devices that hold data, then write a fresh header with one slot.

use super::{io_err, now_secs, provider_for, CmdError};
use crate::backend::{Backend, FileBackend};
use crate::cli::FormatArgs;
use crate::header::{self, store, Binding, Header, KeySlot};
use crate::keys::{self, KeyProvider};
use crate::units::SectorSize;

/// Known signatures of things worth not overwriting: (offset, bytes, name).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (0, b"XFSB", "an XFS filesystem"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (512, b"EFI PART", "a GPT partition table"),
    (510, b"\x55\xaa", "an MBR partition table or boot sector"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (0x8001, b"CD001", "an ISO 9660 filesystem"),
];

/// Why a device looks like it holds data, if it does: a known signature, or any non-zero
/// byte in its first MiB.
fn looks_used(dev: &dyn Backend) -> Result<Option<String>, CmdError> {
    let n = (1u64 << 20).min(dev.size()) as usize;
    let mut buf = vec![0u8; n];
    dev.read_at(&mut buf, 0).map_err(io_err("reading the start of the device"))?;
    for (off, sig, name) in SIGNATURES {
        if buf.get(*off..off + sig.len()) == Some(sig) {
            return Ok(Some(format!("it holds {name}")));
        }
    }
    Ok(buf.iter().position(|&b| b != 0).map(|i| format!("its first MiB is not blank (non-zero byte at offset {i})")))
}

pub(super) async fn format(args: FormatArgs) -> Result<(), CmdError> {
    let sector =
        SectorSize::new(args.sector_size).ok_or_else(|| CmdError::Usage("--sector-size must be 512 or 4096".into()))?;
    if let Some(id) = &args.bind_volume_id {
        if id.is_empty() || id.len() > header::MAX_SHORT_STRING {
            return Err(CmdError::Usage(format!("--bind-volume-id must be 1 to {} bytes", header::MAX_SHORT_STRING)));
        }
    }
    let provider = provider_for(&args.key, &args.kms).await?;
    let dev =
        FileBackend::open(&args.device, true).map_err(io_err(format!("cannot open {}", args.device.display())))?;
    if !args.yes {
        if store::probe(&dev)? {
            return Err(CmdError::Refused(format!(
                "{} already has an nbdcrypt header; formatting destroys its key (use --yes)",
                args.device.display()
            )));
        }
        if let Some(why) = looks_used(&dev)? {
            return Err(CmdError::Refused(format!(
                "{} looks like it holds data: {why} (use --yes)",
                args.device.display()
            )));
        }
    }
    let binding = args.bind_volume_id.map(|volume_id| Binding { volume_id });
    let header = format_backend_bound(&dev, provider.as_ref(), sector, args.context, binding).await?;
    println!(
        "formatted {}: uuid {}, aes-xts-plain64, {}-byte sectors, data {} bytes at offset {}, slot 0 = {} {}",
        args.device.display(),
        header.uuid,
        header.sector_size,
        header.data_size,
        header.data_offset,
        header.slots[0].provider,
        header.slots[0].key_id
    );
    if let Some(b) = &header.binding {
        println!("bound to volume {}", b.volume_id);
    }
    Ok(())
}

/// Writes a fresh header with one slot wrapped by `provider`. No safety checks: callers decide.
pub async fn format_backend(
    dev: &dyn Backend,
    provider: &dyn KeyProvider,
    sector: SectorSize,
    extra_context: Vec<(String, String)>,
) -> Result<Header, CmdError> {
    format_backend_bound(dev, provider, sector, extra_context, None).await
}

/// [`format_backend`] with an optional binding to a cloud volume id, which goes under the
/// header MAC and into the slot's encryption context.
pub async fn format_backend_bound(
    dev: &dyn Backend,
    provider: &dyn KeyProvider,
    sector: SectorSize,
    extra_context: Vec<(String, String)>,
    binding: Option<Binding>,
) -> Result<Header, CmdError> {
    let data_offset = header::DEFAULT_DATA_OFFSET;
    let min = data_offset + (1 << 20);
    if dev.size() < min {
        return Err(CmdError::Usage(format!("the device is {} bytes; it must hold at least {min}", dev.size())));
    }
    let data_size = sector.align_down(dev.size() - data_offset);
    let uuid = uuid::Uuid::new_v4();
    let ctx = keys::slot_context(&uuid, binding.as_ref().map(|b| b.volume_id.as_str()), &extra_context)
        .map_err(CmdError::Usage)?;
    let (key, wrapped) = provider.generate(&ctx).await?;
    let mut h = Header::new(uuid, sector, data_offset, data_size, binding, &key)?;
    h.slots.push(KeySlot {
        id: 0,
        provider: provider.kind().into(),
        key_id: wrapped.key_id,
        wrapped: wrapped.ciphertext,
        context: ctx,
        created: now_secs(),
    });
    store::write_new(dev, &mut h)?;
    Ok(h)
}
