//! Raw images: the disk's bytes are the file's bytes. Sparse where the file system allows.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backend::{check_range, DiskBackend, Extent};
use crate::error::{Error, Result};
use crate::fileio;

/// A raw disk image file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    /// Opens an existing raw image; its virtual size is the file's length.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("opening raw image {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?
            .len();
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    /// Creates a new sparse raw image of `size` bytes; fails if `path` already exists.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating raw image {}", path.display()), e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("setting the size of {}", path.display()), e))?;
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
            read_only: false,
        })
    }

    /// Grows the image to `new_size` bytes (the new bytes read as zeros); never shrinks.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if new_size < self.size {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink {} from {} to {} bytes",
                self.path.display(),
                self.size,
                new_size
            )));
        }
        self.file
            .set_len(new_size)
            .map_err(|e| self.io_err("growing", e))?;
        self.size = new_size;
        Ok(())
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    fn io_err(&self, what: &str, e: io::Error) -> Error {
        Error::io(format!("{what} raw image {}", self.path.display()), e)
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl DiskBackend for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        // The file may have been truncated behind our back: read what is there, zeros past it.
        fileio::read_zero_fill(&self.file, buf, offset).map_err(|e| self.io_err("reading", e))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("writing", e))
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io_err("syncing", e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable(offset, len)?;
        if fileio::punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        fileio::write_zeros_plain(&self.file, offset, len).map_err(|e| self.io_err("zeroing", e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable(offset, len)?;
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if fileio::fallocate(&self.file, zero_range, offset, len).is_ok()
            || fileio::punch_hole(&self.file, offset, len).is_ok()
        {
            return Ok(());
        }
        fileio::write_zeros_plain(&self.file, offset, len).map_err(|e| self.io_err("zeroing", e))
    }

    fn flat_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn extent(&mut self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok((Extent::Data, 0));
        }
        let (data, end) = fileio::file_extent(&self.file, offset, offset + len);
        Ok((if data { Extent::Data } else { Extent::Zero }, end - offset))
    }
}
