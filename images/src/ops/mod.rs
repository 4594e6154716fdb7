//! Whole-image operations for a disk store: information, creating blank disks and overlays,
//! growing, copying and cloning, importing from a stream and exporting to one.
//!
//! Every operation that creates a file refuses a destination that exists and leaves nothing
//! behind when it fails. Sources are opened read-only with the caller's [`OpenOptions`], so
//! their backing chains are checked as when a VM opens them.

mod copy;
mod export;
mod import;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::backend::{DiskBackend, Extent};
use crate::error::{Error, Result};
use crate::qcow2::DEFAULT_CLUSTER_BITS;
use crate::{detect_format, Format, OpenOptions, Qcow2Disk, RawDisk};

pub use copy::{clone_image, copy_to_raw, create_from_snapshot, snapshot_raw, RawCopy};
pub use export::export;
pub use import::{import, ImportSummary};

/// Bytes read or written at a time by copies, imports and exports.
const CHUNK: usize = 1 << 20;

/// What an image file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file's format.
    pub format: Format,
    /// The size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// The space the file takes on the host file system (`st_blocks` × 512), in bytes.
    pub actual_size: u64,
    /// The backing file's canonical path (symlinks and `..` resolved), if it has one.
    pub backing: Option<PathBuf>,
    /// The backing file's format, if it has one.
    pub backing_format: Option<Format>,
}

/// Opens the image at `path` read-only (validating it and its backing chain with `opts`,
/// as [`crate::open_disk`] does) and tells what it is. Fails for anything but a regular
/// file.
pub fn info(path: &Path, opts: &OpenOptions) -> Result<ImageInfo> {
    check_regular(path)?;
    let format = detect_format(path)?;
    let (virtual_size, backing, backing_format) = match format {
        Format::Raw => (RawDisk::open(path, true)?.size(), None, None),
        Format::Qcow2 => {
            let d = Qcow2Disk::open(path, true, opts)?;
            (
                d.size(),
                d.backing_path().map(Path::to_path_buf),
                d.backing_format(),
            )
        }
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?;
    Ok(ImageInfo {
        format,
        virtual_size,
        actual_size: meta.blocks() * 512,
        backing,
        backing_format,
    })
}

/// Creates a blank disk of `size` bytes (a multiple of 512) that reads as zeros: a sparse
/// raw file, or a qcow2 version 3 image with 64 KiB clusters and nothing allocated. Fails if
/// `path` exists.
pub fn create_blank(path: &Path, format: Format, size: u64) -> Result<()> {
    check_sector_multiple("size", size)?;
    refuse_existing(path)?;
    match format {
        Format::Raw => {
            let (file, guard) = create_new(path)?;
            let io = |e| Error::io(format!("creating raw image {}", path.display()), e);
            file.set_len(size).map_err(io)?;
            file.sync_all().map_err(io)?;
            guard.keep();
            Ok(())
        }
        Format::Qcow2 => Qcow2Disk::create(path, size, DEFAULT_CLUSTER_BITS, None),
    }
}

/// Creates at `path` a qcow2 version 3 image (64 KiB clusters) whose backing file is
/// `backing`: the new disk reads as `backing` until it is written, and writes never touch
/// `backing`.
///
/// The backing file's canonical absolute path is stored, with its format. `backing` must
/// open with `opts` (its own chain is checked), and the new image must too: `backing` has
/// to lie in one of `opts.allowed_dirs` and the chain must stay within `opts.max_chain`.
/// `size` defaults to the backing file's virtual size (rounded up to 512 bytes) and may
/// not be smaller; it must be a multiple of 512. Fails if `path` exists.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    size: Option<u64>,
    opts: &OpenOptions,
) -> Result<()> {
    if let Some(size) = size {
        check_sector_multiple("size", size)?;
    }
    refuse_existing(path)?;
    check_regular(backing)?;
    let resolved = std::fs::canonicalize(backing).map_err(|e| {
        Error::io(
            format!("resolving the backing file {}", backing.display()),
            e,
        )
    })?;
    let format = detect_format(&resolved)?;
    let backing_size = crate::open_disk(&resolved, true, opts)?.size();
    let size = size.unwrap_or(backing_size);
    if size < backing_size {
        return Err(Error::InvalidArgument(format!(
            "the overlay's size of {size} bytes is smaller than its backing file {} ({backing_size} bytes)",
            resolved.display()
        )));
    }
    Qcow2Disk::create(path, size, DEFAULT_CLUSTER_BITS, Some((&resolved, format)))?;
    let guard = Cleanup::new(path);
    // The new image must open as a VM will open it: the backing file allowed, the chain
    // not too deep.
    Qcow2Disk::open(path, true, opts)?;
    guard.keep();
    Ok(())
}

/// Grows the disk at `path` (raw or qcow2, opened with `opts`) to `new_size` bytes, a
/// multiple of 512; the new bytes read as zeros. Refuses to shrink; the same size is a
/// no-op. The disk must not be in use.
pub fn grow(path: &Path, new_size: u64, opts: &OpenOptions) -> Result<()> {
    check_sector_multiple("new size", new_size)?;
    check_regular(path)?;
    match detect_format(path)? {
        Format::Raw => {
            let mut d = RawDisk::open(path, false)?;
            d.grow(new_size)?;
            d.flush()
        }
        Format::Qcow2 => {
            let mut d = Qcow2Disk::open(path, false, opts)?;
            d.grow(new_size)?;
            d.flush()
        }
    }
}

/// Refuses a size that is not a whole number of 512-byte sectors.
fn check_sector_multiple(what: &str, size: u64) -> Result<()> {
    if size.is_multiple_of(512) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {size} is not a multiple of 512 bytes"
        )))
    }
}

/// Refuses a source that is not a regular file (a directory, a device, a socket).
fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )))
    }
}

/// Refuses a destination that exists (even as a dangling symlink).
fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists",
            path.display()
        )));
    }
    Ok(())
}

/// Creates a new, empty file (never an existing one), with a guard that removes it again
/// unless it is kept.
fn create_new(path: &Path) -> Result<(File, Cleanup)> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => Ok((f, Cleanup::new(path))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::InvalidArgument(
            format!("{} already exists", path.display()),
        )),
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// Removes a file an operation created, when the operation fails (or panics) before it
/// calls [`Cleanup::keep`].
#[must_use]
struct Cleanup {
    path: Option<PathBuf>,
}

impl Cleanup {
    fn new(path: &Path) -> Self {
        Cleanup {
            path: Some(path.to_path_buf()),
        }
    }

    /// The operation succeeded: the file stays.
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads all of `src` in order, in windows of at most [`CHUNK`] bytes starting at multiples
/// of `align` (a power of two dividing [`CHUNK`]), and calls `f(offset, bytes)` on each.
/// Windows that [`DiskBackend::extent`] says read as zeros are skipped without reading,
/// a whole multiple of `align` at a time. `progress` gets the bytes of the disk done.
fn scan(
    src: &mut dyn DiskBackend,
    align: u64,
    progress: &mut dyn FnMut(u64),
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let size = src.size();
    let mut buf = vec![0u8; size.min(CHUNK as u64) as usize];
    let mut pos = 0u64;
    while pos < size {
        let wend = (pos + CHUNK as u64).min(size);
        let (ext, n) = src.extent(pos, wend - pos)?;
        if ext == Extent::Zero && n >= wend - pos {
            // The whole window reads as zeros: see how far the zeros go.
            let (ext, n) = src.extent(pos, size - pos)?;
            let zend = if ext == Extent::Zero { pos + n } else { wend };
            pos = if zend >= size {
                size
            } else {
                (zend / align * align).max(wend)
            };
            progress(pos);
            continue;
        }
        let w = &mut buf[..(wend - pos) as usize];
        src.read_at(w, pos)?;
        f(pos, w)?;
        pos = wend;
        progress(pos);
    }
    Ok(())
}
