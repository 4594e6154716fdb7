//! Full copies of a disk: to a raw file (holes kept), or to a new qcow2 image.

use std::fs::File;
use std::path::Path;

use super::{check_regular, create_new, refuse_existing, scan, Cleanup, CHUNK};
use crate::backend::DiskBackend;
use crate::error::{Error, Result};
use crate::fileio::{self, SPARSE_BLOCK};
use crate::qcow2::stream::FileWriter;
use crate::qcow2::DEFAULT_CLUSTER_BITS;
use crate::{detect_format, open_disk, Format, OpenOptions, Qcow2Disk, RawDisk};

/// Largest range handed to one `copy_file_range` call (progress is reported between calls).
const COPY_RANGE_CHUNK: u64 = 64 << 20;

/// Makes `dst`, a new raw file, a full and independent copy of the disk at `src`.
///
/// A raw `src` is cloned with `FICLONE` (a reflink: instant, sharing blocks copy-on-write)
/// where the file system can; otherwise its data extents (found with `SEEK_DATA` and
/// `SEEK_HOLE`) are copied with `copy_file_range`, so that holes stay holes. A qcow2 `src`
/// (opened read-only with `opts`, with its backing chain) is read through the backend and
/// the blocks that are all zeros are not written, so `dst` is sparse.
///
/// `progress` gets the bytes of the virtual disk done so far. Fails if `dst` exists; on any
/// error `dst` is removed.
pub fn copy_to_raw(
    src: &Path,
    dst: &Path,
    opts: &OpenOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    check_regular(src)?;
    refuse_existing(dst)?;
    let guard = match detect_format(src)? {
        Format::Raw => copy_raw_file(&RawDisk::open(src, true)?, dst, progress)?.0,
        Format::Qcow2 => backend_to_raw(&mut Qcow2Disk::open(src, true, opts)?, dst, progress)?,
    };
    guard.keep();
    Ok(())
}

/// Makes `dst`, a new image in `format`, an independent disk with the same content as the
/// disk at `src` (raw or qcow2, opened read-only with `opts`).
///
/// To raw, this is [`copy_to_raw`]. To qcow2, the result is a version 3 image with 64 KiB
/// clusters in which only the clusters that are not all zeros are allocated, written in one
/// sequential pass.
///
/// The result never has a backing file, even when `src` is an overlay: the backing chain is
/// read through and its content copied. A clone thus depends on no other file (the image
/// it came from can be deleted), at the price of storing what the overlay shared with its
/// backing file.
///
/// `progress` gets the bytes of the virtual disk done so far. Fails if `dst` exists; on any
/// error `dst` is removed.
pub fn clone_image(
    src: &Path,
    dst: &Path,
    format: Format,
    opts: &OpenOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    match format {
        Format::Raw => copy_to_raw(src, dst, opts, progress),
        Format::Qcow2 => {
            check_regular(src)?;
            refuse_existing(dst)?;
            let mut disk = open_disk(src, true, opts)?;
            backend_to_qcow2(disk.as_mut(), dst, progress)?.keep();
            Ok(())
        }
    }
}

/// Writes the content of `src` into `dst`, a new sparse raw file. The returned guard removes
/// `dst` unless it is kept.
pub(super) fn backend_to_raw(
    src: &mut dyn DiskBackend,
    dst: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Cleanup> {
    let (file, guard) = create_new(dst)?;
    let io = |e| Error::io(format!("writing {}", dst.display()), e);
    file.set_len(src.size()).map_err(io)?;
    scan(src, SPARSE_BLOCK as u64, progress, &mut |offset, buf| {
        fileio::write_sparse(&file, buf, offset).map_err(io)
    })?;
    file.sync_all().map_err(io)?;
    Ok(guard)
}

/// Writes the content of `src` into `dst`, a new qcow2 image (64 KiB clusters, only the
/// clusters that are not all zeros allocated). The returned guard removes `dst` unless it
/// is kept.
pub(super) fn backend_to_qcow2(
    src: &mut dyn DiskBackend,
    dst: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Cleanup> {
    let (file, guard) = create_new(dst)?;
    let mut writer = FileWriter::new(&file, dst, DEFAULT_CLUSTER_BITS);
    scan(
        src,
        1 << DEFAULT_CLUSTER_BITS,
        progress,
        &mut |offset, buf| writer.feed(offset, buf),
    )?;
    writer.finish(src.size())?;
    Ok(guard)
}

/// How a raw disk's point-in-time copy was made ([`snapshot_raw`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCopy {
    /// A reflink: no data copied, blocks shared copy-on-write with the disk.
    pub reflinked: bool,
    /// Bytes of data copied (the data extents, holes skipped); 0 for a reflink.
    pub copied: u64,
}

/// Makes `dst` (a new file) a point-in-time copy of the raw disk at `src`: a reflink
/// (`FICLONE`) where the file system has them (btrfs, XFS), else a copy of its data extents.
/// Says which, and how much was copied. The caller keeps writers away meanwhile (a running
/// disk's device holds its lock). Fails if `dst` exists; on error `dst` is removed.
pub fn snapshot_raw(src: &Path, dst: &Path) -> Result<RawCopy> {
    check_regular(src)?;
    refuse_existing(dst)?;
    let (guard, copy) = copy_raw_file(&RawDisk::open(src, true)?, dst, &mut |_| {})?;
    guard.keep();
    Ok(copy)
}

/// Makes `dst`, a new image in `format`, an independent disk with the content of the qcow2
/// image at `src` as it was when its internal snapshot `snapshot` (a name or an id) was
/// taken. Fails if `dst` exists; on error `dst` is removed.
pub fn create_from_snapshot(
    src: &Path,
    snapshot: &str,
    dst: &Path,
    format: Format,
    opts: &OpenOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    check_regular(src)?;
    refuse_existing(dst)?;
    let mut disk = Qcow2Disk::open_snapshot(src, snapshot, opts)?;
    let guard = match format {
        Format::Raw => backend_to_raw(&mut disk, dst, progress)?,
        Format::Qcow2 => backend_to_qcow2(&mut disk, dst, progress)?,
    };
    guard.keep();
    Ok(())
}

/// Copies a raw image file into `dst`, a new file: a reflink where the file system can make
/// one, else its data extents only.
fn copy_raw_file(
    src: &RawDisk,
    dst: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(Cleanup, RawCopy)> {
    let (file, guard) = create_new(dst)?;
    let io = |e| {
        Error::io(
            format!("copying {} to {}", src.path().display(), dst.display()),
            e,
        )
    };
    let size = src.size();
    let from = src.file();
    let mut copy = RawCopy {
        reflinked: false,
        copied: 0,
    };
    if rustix::fs::ioctl_ficlone(&file, from).is_ok() {
        // The clone has the source's length as it is now; the disk's size is what was
        // measured when it was opened.
        file.set_len(size).map_err(io)?;
        copy.reflinked = true;
    } else {
        file.set_len(size).map_err(io)?;
        let mut pos = 0;
        while pos < size {
            let (data, end) = fileio::file_extent(from, pos, size);
            if data {
                copy_range(from, &file, pos, end - pos, progress).map_err(io)?;
                copy.copied += end - pos;
            }
            pos = end;
            progress(pos);
        }
    }
    file.sync_all().map_err(io)?;
    progress(size);
    Ok((guard, copy))
}

/// Copies `len` bytes at `offset` from `from` to the same offset of `to`, by
/// `copy_file_range`, or by reads and sparse writes where that is not supported.
fn copy_range(
    from: &File,
    to: &File,
    offset: u64,
    len: u64,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<()> {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (mut off_in, mut off_out) = (pos, pos);
        let want = (end - pos).min(COPY_RANGE_CHUNK) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            // The source is shorter than it was: the rest stays zeros.
            Ok(0) => return Ok(()),
            Ok(n) => {
                pos += n as u64;
                progress(pos);
            }
            Err(rustix::io::Errno::INTR) => {}
            // Not supported between these files (EXDEV, EOPNOTSUPP, EINVAL, ENOSYS...).
            Err(_) => return copy_plain(from, to, pos, end - pos),
        }
    }
    Ok(())
}

/// Copies with reads and sparse writes, a bounded buffer at a time.
fn copy_plain(from: &File, to: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; (CHUNK as u64).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (CHUNK as u64).min(len - done) as usize;
        fileio::read_zero_fill(from, &mut buf[..n], offset + done)?;
        fileio::write_sparse(to, &buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
