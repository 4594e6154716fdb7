//! Disk images as files: the backends a virtio-blk device reads and writes through.
//!
//! Two formats: [`RawDisk`] (the file is the disk, sparse where possible) and [`Qcow2Disk`]
//! (qcow2 version 3 read and write, version 2 read and write, backing files, zero and compressed
//! clusters). Both implement [`DiskBackend`]. [`open_disk`] opens either after
//! [`detect_format`]. Hostile images are refused with an [`Error`] when they are opened.
//!
//! Whole-image operations, for a store of disks and images:
//!
//! | function | does |
//! |---|---|
//! | [`info`] | format, virtual size, space used, backing file (validating the image) |
//! | [`create_blank`] | a new disk that reads as zeros: sparse raw, or qcow2 with nothing allocated |
//! | [`create_overlay`] | a new qcow2 disk on a backing file (stored as an absolute path) |
//! | [`grow`] | grows either format; never shrinks |
//! | [`copy_to_raw`] | an independent raw copy: a reflink, or the data extents only (holes kept) |
//! | [`clone_image`] | an independent copy in either format, backing chains flattened |
//! | [`import`] | a new disk from a raw or qcow2 byte stream of unknown length |
//! | [`export`] | a disk as a raw or qcow2 byte stream, written strictly sequentially |
//! | [`snapshot_raw`] | a raw disk's point-in-time copy: a reflink, else its data extents |
//! | [`create_from_snapshot`] | a new disk from a qcow2 image's internal snapshot |
//!
//! Disk snapshots: a qcow2 image keeps internal snapshots ([`Qcow2Disk::create_snapshot`],
//! [`Qcow2Disk::snapshots`], [`Qcow2Disk::delete_snapshot`], [`Qcow2Disk::revert_to_snapshot`],
//! also through [`DiskBackend::create_snapshot`] on an open disk), as QEMU does; a raw disk's
//! snapshot is a file ([`snapshot_raw`]).
//!
//! They refuse destinations that exist and leave nothing behind when they fail. Copies and
//! exports skip what [`DiskBackend::extent`] knows to read as zeros, and never allocate
//! blocks (raw) or clusters (qcow2) that are all zeros. New qcow2 images are version 3 with
//! 64 KiB clusters. Memory stays bounded whatever the size of the disk: buffers of 1 MiB,
//! and for qcow2 results a bitmap of the clusters that hold data.
//!
//! This crate's directory also holds the probe guest (`probe/`) and the distro-guest recipe
//! (`guest/`).

#![warn(missing_docs)]

mod backend;
mod error;
mod fileio;
mod ops;
pub mod qcow2;
mod raw;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use backend::{DiskBackend, Extent};
pub use error::{Error, Result};
pub use ops::{
    clone_image, copy_to_raw, create_blank, create_from_snapshot, create_overlay, export, grow,
    import, info, snapshot_raw, ImageInfo, ImportSummary, RawCopy,
};
pub use qcow2::{Qcow2Disk, SnapshotInfo};
pub use raw::RawDisk;

/// The on-disk format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The disk's bytes as they are.
    Raw,
    /// QEMU copy-on-write version 2 or 3.
    Qcow2,
}

impl Format {
    /// The format's name as QEMU spells it (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a format name as QEMU spells it; `None` for any other name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How images and their backing files may be opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Directories a backing file must lie in (after resolving symlinks and `..`). An image
    /// whose backing file resolves anywhere else is refused; with an empty list, every image
    /// that has a backing file is refused.
    pub allowed_dirs: Vec<PathBuf>,
    /// The most backing files a chain may have below the opened image (0: none allowed).
    pub max_chain: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            allowed_dirs: Vec::new(),
            max_chain: 16,
        }
    }
}

/// Tells a qcow2 image (by its magic) from anything else, which is taken as raw.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading image {}", path.display()), e)),
        }
    }
    if got == magic.len() && magic == qcow2::MAGIC {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Opens an image of either format, detecting which it is.
pub fn open_disk(
    path: impl AsRef<Path>,
    read_only: bool,
    opts: &OpenOptions,
) -> Result<Box<dyn DiskBackend>> {
    let path = path.as_ref();
    Ok(match detect_format(path)? {
        Format::Raw => Box::new(RawDisk::open(path, read_only)?),
        Format::Qcow2 => Box::new(Qcow2Disk::open(path, read_only, opts)?),
    })
}
