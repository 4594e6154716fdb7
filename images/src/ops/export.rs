//! Exporting a disk as a byte stream.

use std::io::Write;
use std::path::Path;

use super::{check_regular, scan, CHUNK};
use crate::error::{Error, Result};
use crate::fileio::SPARSE_BLOCK;
use crate::qcow2::stream::{write_stream, DataMap};
use crate::qcow2::DEFAULT_CLUSTER_BITS;
use crate::{open_disk, Format, OpenOptions};

/// Writes the content of the disk at `src` (raw or qcow2, opened read-only with `opts`,
/// backing chains read through) into `writer`, strictly sequentially (it may be a pipe or
/// a socket), as `format`:
///
/// - raw: every byte of the virtual disk, in order;
/// - qcow2: a self-contained version 3 image (64 KiB clusters, no backing file) that
///   holds only the clusters that are not all zeros. A first pass finds them (reading only
///   what [`crate::DiskBackend::extent`] does not know to be zeros); the second writes the
///   header, refcounts, L1 and L2 tables and then the data.
///
/// The disk must not change while it is exported. `progress` gets the bytes written so
/// far; returns how many were written in all. The writer is flushed at the end.
pub fn export(
    src: &Path,
    format: Format,
    writer: &mut dyn Write,
    opts: &OpenOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    check_regular(src)?;
    let mut disk = open_disk(src, true, opts)?;
    let written = match format {
        Format::Raw => {
            let size = disk.size();
            let mut out = RawOut {
                writer: &mut *writer,
                progress,
                written: 0,
                zeros: Vec::new(),
            };
            scan(
                disk.as_mut(),
                SPARSE_BLOCK as u64,
                &mut |_| {},
                &mut |offset, buf| {
                    out.zeros_to(offset)?;
                    out.put(buf)
                },
            )?;
            out.zeros_to(size)?;
            out.written
        }
        Format::Qcow2 => {
            let mut map = DataMap::new(DEFAULT_CLUSTER_BITS);
            scan(
                disk.as_mut(),
                1 << DEFAULT_CLUSTER_BITS,
                &mut |_| {},
                &mut |offset, buf| {
                    map.mark(offset, buf);
                    Ok(())
                },
            )?;
            write_stream(disk.as_mut(), &map, writer, progress)?
        }
    };
    writer
        .flush()
        .map_err(|e| Error::io("flushing the export stream", e))?;
    Ok(written)
}

/// The raw export stream: bytes read, and zeros for what was skipped.
struct RawOut<'a> {
    writer: &'a mut dyn Write,
    progress: &'a mut dyn FnMut(u64),
    written: u64,
    zeros: Vec<u8>,
}

impl RawOut<'_> {
    fn put(&mut self, buf: &[u8]) -> Result<()> {
        self.writer
            .write_all(buf)
            .map_err(|e| Error::io("writing the export stream", e))?;
        self.written += buf.len() as u64;
        (self.progress)(self.written);
        Ok(())
    }

    /// Writes zeros up to byte `end` of the disk.
    fn zeros_to(&mut self, end: u64) -> Result<()> {
        while self.written < end {
            let n = (end - self.written).min(CHUNK as u64) as usize;
            if self.zeros.len() < n {
                self.zeros = vec![0u8; CHUNK];
            }
            let zeros = std::mem::take(&mut self.zeros);
            let res = self.put(&zeros[..n]);
            self.zeros = zeros;
            res?;
        }
        Ok(())
    }
}
