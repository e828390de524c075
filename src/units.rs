//! Typed sector arithmetic.
//!
//! Byte offsets and sector indices are different units; mixing them is the classic bug of
//! block-layer code (dm-crypt's `iv_large_sectors` exists because of it). `SectorSize` is
//! validated once, and conversions that can fail (unaligned, overflowing) return `None`.

use std::fmt;

/// The encryption sector size of a volume: 512 or 4096 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectorSize(u32);

impl SectorSize {
    pub const S512: SectorSize = SectorSize(512);
    pub const S4096: SectorSize = SectorSize(4096);

    /// Accepts only the sizes the data path supports.
    pub fn new(bytes: u32) -> Option<Self> {
        match bytes {
            512 | 4096 => Some(SectorSize(bytes)),
            _ => None,
        }
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    pub fn bytes_u64(self) -> u64 {
        u64::from(self.0)
    }

    pub fn bytes_usize(self) -> usize {
        self.0 as usize
    }

    /// log2 of the size, for shifts.
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// True if `bytes` is a multiple of the sector size.
    pub fn is_aligned(self, bytes: u64) -> bool {
        bytes & (self.bytes_u64() - 1) == 0
    }

    /// The sector holding byte `offset` of the data area.
    pub fn sector_of(self, offset: u64) -> SectorIndex {
        SectorIndex(offset >> self.shift())
    }

    /// Rounds `bytes` down to a sector boundary.
    pub fn align_down(self, bytes: u64) -> u64 {
        bytes & !(self.bytes_u64() - 1)
    }

    /// Rounds `bytes` up to a sector boundary; `None` on overflow.
    pub fn align_up(self, bytes: u64) -> Option<u64> {
        let mask = self.bytes_u64() - 1;
        bytes.checked_add(mask).map(|b| b & !mask)
    }
}

impl fmt::Display for SectorSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Index of an encryption sector, counted from the start of the data area in units of the
/// volume's sector size. This is the XTS tweak (plain64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorIndex(pub u64);

impl SectorIndex {
    /// Byte offset of this sector within the data area; `None` on overflow.
    pub fn byte_offset(self, size: SectorSize) -> Option<u64> {
        self.0.checked_mul(size.bytes_u64())
    }

    /// The sector `n` sectors further on; `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<SectorIndex> {
        self.0.checked_add(n).map(SectorIndex)
    }

    /// The plain64 tweak: the index as 16 little-endian bytes.
    pub fn tweak(self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&self.0.to_le_bytes());
        t
    }
}

/// A byte range inside the data area, `offset + len` already checked not to overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    /// `None` if `offset + len` overflows.
    pub fn new(offset: u64, len: u64) -> Option<Self> {
        offset.checked_add(len)?;
        Some(ByteRange { offset, len })
    }

    /// One past the last byte; cannot overflow (checked at construction).
    pub fn end(self) -> u64 {
        self.offset + self.len
    }

    /// True if the range lies within `[0, size)`.
    pub fn fits_in(self, size: u64) -> bool {
        self.end() <= size
    }

    /// The smallest sector-aligned range covering this one; `None` on overflow.
    pub fn widen_to(self, size: SectorSize) -> Option<ByteRange> {
        let start = size.align_down(self.offset);
        let end = size.align_up(self.end())?;
        Some(ByteRange { offset: start, len: end - start })
    }

    /// True if both ends are on sector boundaries.
    pub fn is_aligned(self, size: SectorSize) -> bool {
        size.is_aligned(self.offset) && size.is_aligned(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_size_accepts_only_supported_sizes() {
        assert!(SectorSize::new(512).is_some());
        assert!(SectorSize::new(4096).is_some());
        assert!(SectorSize::new(1024).is_none());
        assert!(SectorSize::new(0).is_none());
    }

    #[test]
    fn widen_covers_partial_sectors() {
        let r = ByteRange::new(4095, 2).unwrap().widen_to(SectorSize::S4096).unwrap();
        assert_eq!(r, ByteRange { offset: 0, len: 8192 });
    }

    #[test]
    fn range_rejects_overflow() {
        assert!(ByteRange::new(u64::MAX, 1).is_none());
        assert!(ByteRange::new(u64::MAX - 10, 5).unwrap().widen_to(SectorSize::S4096).is_none());
    }

    #[test]
    fn tweak_is_little_endian_index() {
        let t = SectorIndex(0x0102).tweak();
        assert_eq!(&t[..3], &[0x02, 0x01, 0x00]);
        assert!(t[8..].iter().all(|&b| b == 0));
    }
}
