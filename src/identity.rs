//! Which cloud volume a raw device is, for the header's clone binding.
//!
//! On EC2 Nitro instances an EBS volume is an NVMe namespace whose controller serial number is
//! the volume id without its dash (`vol0123456789abcdef0`, readable at
//! `/sys/block/nvme1n1/device/serial`, also visible in `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…`).
//! A snapshot restored to a new volume, or a header copied with `dd`, carries the binding of
//! the original volume; comparing it with the device's own id detects that. Anything else
//! (a file, a Xen `xvd` device, instance storage) has no id here, and the operator can give
//! one with `--device-id`.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The EBS volume id of the block device at `path` (symlinks followed, partitions mapped to
/// their disk), or `None` when it is not an EBS NVMe device or sysfs does not say.
pub fn device_volume_id(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    if !std::fs::metadata(&real).ok()?.file_type().is_block_device() {
        return None;
    }
    let name = real.file_name()?.to_str()?;
    volume_id_in_sysfs(Path::new("/sys/class/block"), name)
}

/// The EBS volume id of block device `name` under a sysfs `class/block` directory (a
/// parameter so that tests can build a fake tree).
pub fn volume_id_in_sysfs(class_block: &Path, name: &str) -> Option<String> {
    let mut dev = class_block.join(name);
    if dev.join("partition").exists() {
        // A partition's sysfs directory sits inside its disk's.
        let disk = std::fs::canonicalize(&dev).ok()?.parent()?.file_name()?.to_owned();
        dev = class_block.join(disk);
    }
    // Bounded read: a serial is 20 bytes; refuse anything absurd rather than allocate for it.
    let serial = std::fs::read(dev.join("device").join("serial")).ok()?;
    if serial.len() > 256 {
        return None;
    }
    ebs_volume_id_from_serial(std::str::from_utf8(&serial).ok()?)
}

/// `vol0123456789abcdef0` (an EBS NVMe serial, possibly space-padded) → `vol-0123456789abcdef0`.
pub fn ebs_volume_id_from_serial(serial: &str) -> Option<String> {
    let s = serial.trim();
    let hex = s.strip_prefix("vol-").or_else(|| s.strip_prefix("vol"))?;
    (!hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("vol-{}", hex.to_ascii_lowercase()))
}

/// Whether two volume ids name the same volume, ignoring case and dashes (`vol-0abc` and the
/// NVMe serial form `vol0abc` are the same volume).
pub fn same_volume(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().chars().filter(|c| *c != '-').flat_map(char::to_lowercase).collect::<String>();
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_becomes_volume_id() {
        assert_eq!(ebs_volume_id_from_serial("vol0123456789abcdef0  \n").as_deref(), Some("vol-0123456789abcdef0"));
        assert_eq!(ebs_volume_id_from_serial("vol-0abc").as_deref(), Some("vol-0abc"));
        assert_eq!(ebs_volume_id_from_serial("AWS1234567890ABCDEF"), None);
        assert_eq!(ebs_volume_id_from_serial("vol"), None);
        assert_eq!(ebs_volume_id_from_serial("volume"), None);
    }

    #[test]
    fn comparison_ignores_dashes_and_case() {
        assert!(same_volume("vol-0ABC", "vol0abc"));
        assert!(!same_volume("vol-0abc", "vol-0abd"));
    }

    #[test]
    fn sysfs_serial_is_found_for_disks_and_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("class_block");
        let devices = dir.path().join("devices");
        let disk = devices.join("nvme1n1");
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("device/serial"), "vol0123456789abcdef0\n").unwrap();
        std::fs::create_dir_all(disk.join("nvme1n1p1")).unwrap();
        std::fs::write(disk.join("nvme1n1p1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&disk, class.join("nvme1n1")).unwrap();
        std::os::unix::fs::symlink(disk.join("nvme1n1p1"), class.join("nvme1n1p1")).unwrap();
        assert_eq!(volume_id_in_sysfs(&class, "nvme1n1").as_deref(), Some("vol-0123456789abcdef0"));
        assert_eq!(volume_id_in_sysfs(&class, "nvme1n1p1").as_deref(), Some("vol-0123456789abcdef0"));
        assert_eq!(volume_id_in_sysfs(&class, "sda"), None);
    }

    #[test]
    fn a_regular_file_has_no_volume_id() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(device_volume_id(f.path()), None);
    }
}
