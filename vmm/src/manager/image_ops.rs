//! Interim image operations until `images` has its own (import, export, clone land there).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use images::{Error, Format, OpenOptions, Qcow2Disk, RawDisk, Result};

pub struct ImageInfo {
    pub format: Format,
    pub virtual_size: u64,
    pub backing: Option<PathBuf>,
}

pub struct ImportSummary {
    pub virtual_size: u64,
}

pub fn info(path: &Path, opts: &OpenOptions) -> Result<ImageInfo> {
    let format = images::detect_format(path)?;
    Ok(match format {
        Format::Raw => ImageInfo {
            format,
            virtual_size: images::DiskBackend::size(&RawDisk::open(path, true)?),
            backing: None,
        },
        Format::Qcow2 => {
            let q = Qcow2Disk::open(path, true, opts)?;
            let backing = q.backing_file().map(|b| {
                let b = Path::new(b);
                path.parent().unwrap_or(Path::new("/")).join(b)
            });
            ImageInfo {
                format,
                virtual_size: images::DiskBackend::size(&q),
                backing,
            }
        }
    })
}

pub fn create_blank(path: &Path, format: Format, size: u64) -> Result<()> {
    match format {
        Format::Raw => RawDisk::create(path, size).map(|_| ()),
        Format::Qcow2 => Qcow2Disk::create(path, size, 16, None),
    }
}

pub fn create_overlay(
    path: &Path,
    backing: &Path,
    size: Option<u64>,
    opts: &OpenOptions,
) -> Result<()> {
    let i = info(backing, opts)?;
    Qcow2Disk::create(
        path,
        size.unwrap_or(i.virtual_size),
        16,
        Some((backing, i.format)),
    )
}

pub fn grow(path: &Path, size: u64, opts: &OpenOptions) -> Result<()> {
    match images::detect_format(path)? {
        Format::Raw => RawDisk::open(path, false)?.grow(size),
        Format::Qcow2 => Qcow2Disk::open(path, false, opts)?.grow(size),
    }
}

fn later(what: &str) -> Error {
    Error::InvalidArgument(format!("{what} is not available yet"))
}

pub fn clone_image(
    _src: &Path,
    _dst: &Path,
    _format: Format,
    _opts: &OpenOptions,
    _progress: &mut dyn FnMut(u64),
) -> Result<()> {
    Err(later("copying a disk"))
}

pub fn import(
    _body: &mut dyn Read,
    _dst: &Path,
    _format: Format,
    _opts: &OpenOptions,
    _progress: &mut dyn FnMut(u64),
) -> Result<ImportSummary> {
    Err(later("import"))
}

pub fn export(
    _src: &Path,
    _format: Format,
    _out: &mut dyn Write,
    _opts: &OpenOptions,
    _progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    Err(later("export"))
}
