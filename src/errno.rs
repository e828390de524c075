//! NBD error values: the 32-bit codes of simple replies and error chunks (`doc/proto.md`,
//! "Error values"). The spec fixes these numbers; they are not the host's errno values.
//!
//! They sit below the protocol module because the layers under it name them too: the export
//! maps each of its failures to one ([`crate::export::ExportError::errno`]) and the metrics
//! count failed requests by them. [`crate::nbd::proto`] re-exports them with the other
//! protocol constants.

/// Operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory; servers should avoid it.
pub const ENOMEM: u32 = 12;
/// Invalid argument (unknown command or flag, a read out of range).
pub const EINVAL: u32 = 22;
/// No space left on device (a write past the end of the export).
pub const ENOSPC: u32 = 28;
/// Value too large (a `NBD_CMD_FLAG_DF` read that cannot fit one chunk).
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (`NBD_CMD_FLAG_FAST_ZERO` when zeroing is not fast).
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Every value the spec lists, with its name.
pub const ALL: [(u32, &str); 8] = [
    (EPERM, "EPERM"),
    (EIO, "EIO"),
    (ENOMEM, "ENOMEM"),
    (EINVAL, "EINVAL"),
    (ENOSPC, "ENOSPC"),
    (EOVERFLOW, "EOVERFLOW"),
    (ENOTSUP, "ENOTSUP"),
    (ESHUTDOWN, "ESHUTDOWN"),
];

/// The position of `errno` in [`ALL`], or `ALL.len()` for a value the spec does not list.
pub fn index(errno: u32) -> usize {
    ALL.iter().position(|&(n, _)| n == errno).unwrap_or(ALL.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_value_has_its_own_slot_and_others_share_the_last() {
        assert_eq!(ALL[index(EIO)], (EIO, "EIO"));
        assert_eq!(ALL[index(ESHUTDOWN)], (ESHUTDOWN, "ESHUTDOWN"));
        assert_eq!(index(999), ALL.len());
    }
}
