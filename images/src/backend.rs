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

    /// The file that holds the disk's bytes at their own offsets (a raw image), so that a
    /// device can move data between it and guest memory with no copy in between; `None`
    /// when the format maps offsets (qcow2). Bytes past the file's end read as zeros.
    fn flat_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// Takes an internal snapshot named `name` of the disk as every completed write left it
    /// (qcow2 only; a raw disk's snapshot is a copy of its file, see
    /// [`crate::snapshot_raw`]).
    fn create_snapshot(&mut self, name: &str) -> Result<()> {
        let _ = name;
        Err(crate::Error::InvalidArgument(
            "internal snapshots need a qcow2 image; a raw disk is snapshotted by copying its file"
                .into(),
        ))
    }

    /// What the bytes from `offset` are, as far as the backend knows without reading them,
    /// and how many bytes from `offset` share that answer (at least 1 and at most `len`, or
    /// 0 when `len` is 0). [`Extent::Zero`] is a promise that the bytes read as zeros;
    /// [`Extent::Data`] promises nothing (the bytes may be zeros too).
    ///
    /// Copies use this to skip holes without reading them. The default answers
    /// [`Extent::Data`] for the whole range.
    fn extent(&mut self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        check_range(offset, len, self.size())?;
        Ok((Extent::Data, len))
    }
}

/// The answer of [`DiskBackend::extent`] about a range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The bytes may hold anything: read them to know.
    Data,
    /// The bytes read as zeros (a hole, a zero cluster, unallocated space).
    Zero,
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}
