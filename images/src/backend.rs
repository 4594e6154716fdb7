//! The trait the block device reads and writes through.

use crate::error::Result;

/// A disk as the guest sees it: a flat array of `size()` bytes.
///
/// All offsets and lengths are in bytes. A request that reaches past `size()` fails with
/// [`crate::Error::OutOfRange`]; nothing here panics on a bad request.
pub trait DiskBackend: Send {
    /// The virtual size of the disk in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&mut self) -> Result<()>;

    /// Deallocates `len` bytes at `offset`; reads of the range return zeros afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, deallocating where the format allows.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Whether the disk was opened read-only (writes then fail with [`crate::Error::ReadOnly`]).
    fn read_only(&self) -> bool;
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}
