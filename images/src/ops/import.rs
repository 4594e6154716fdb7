//! Importing a disk from a byte stream of unknown length, with bounded memory.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::copy::{backend_to_qcow2, backend_to_raw};
use super::{create_new, refuse_existing, CHUNK};
use crate::error::{Error, Result};
use crate::fileio;
use crate::qcow2::stream::FileWriter;
use crate::qcow2::{stored_backing_name, DEFAULT_CLUSTER_BITS, MAGIC};
use crate::{open_disk, DiskBackend, Format, OpenOptions, Qcow2Disk};

/// The name errors give the image being imported (rather than its spool file's).
const STREAM_NAME: &str = "(imported stream)";

/// What [`import`] found in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    /// The format of the stream (qcow2 when it starts with the qcow2 magic, else raw).
    pub source_format: Format,
    /// The virtual size of the imported disk, in bytes.
    pub virtual_size: u64,
}

/// Creates `dst`, a new disk in `format`, from the image in `reader`: a byte stream of
/// unknown length (an HTTP body, a pipe), read once, in order, with buffers of 1 MiB.
///
/// The stream is qcow2 when it starts with the qcow2 magic, raw otherwise.
/// - Raw: the stream is the disk. It must be a whole number of 512-byte sectors, and not
///   empty. It is written straight into `dst`: sparsely for a raw `dst` (blocks of zeros
///   are not written), and for a qcow2 `dst` as a version 3 image with 64 KiB clusters in
///   which only the clusters that are not all zeros are allocated.
/// - qcow2 cannot be read as a stream: it is spooled into a hidden temporary file beside
///   `dst` (`.<dst name>.<random>.import`), which is then validated as any image is when
///   opened (hostile headers and tables are refused) and converted into `dst`. Imports must
///   be self-contained: an image that names a backing file is refused. Its virtual size
///   must be a multiple of 512 bytes.
///
/// `dst` must not exist. On any error, nothing is left behind: neither `dst` nor the spool
/// file. (A process killed in the middle can leave the spool file: its name starts with a
/// dot and ends with `.import`.) `opts` is used to open the result once, as a final check.
/// `progress` gets the bytes read from the stream so far.
pub fn import(
    reader: &mut dyn Read,
    dst: &Path,
    format: Format,
    opts: &OpenOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<ImportSummary> {
    refuse_existing(dst)?;
    let mut buf = vec![0u8; CHUNK];
    let n = fill(reader, &mut buf)?;
    progress(n as u64);
    let mut input = Input {
        reader,
        buf,
        n,
        progress,
    };
    if n >= MAGIC.len() && input.buf[..MAGIC.len()] == MAGIC {
        import_qcow2(&mut input, dst, format, opts)
    } else {
        import_raw(&mut input, dst, format, opts)
    }
}

/// The stream, with its first buffer already read.
struct Input<'a> {
    reader: &'a mut dyn Read,
    buf: Vec<u8>,
    /// Bytes in `buf`; fewer than its length only at the end of the stream.
    n: usize,
    progress: &'a mut dyn FnMut(u64),
}

impl Input<'_> {
    /// Whether the whole stream is in the buffer.
    fn complete(&self) -> bool {
        self.n < self.buf.len()
    }

    /// Hands the whole stream to `sink(offset, bytes)` in order, a full buffer at a time
    /// (the last may be shorter); returns the stream's length.
    fn drain(&mut self, sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let mut off = 0u64;
        loop {
            if self.n > 0 {
                sink(off, &self.buf[..self.n])?;
                off += self.n as u64;
            }
            if self.complete() {
                return Ok(off);
            }
            self.n = fill(self.reader, &mut self.buf)?;
            (self.progress)(off + self.n as u64);
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading the import stream", e)),
        }
    }
    Ok(got)
}

/// Refuses a raw stream that is empty or not a whole number of sectors.
fn check_raw_len(len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::InvalidArgument("the import stream is empty".into()));
    }
    if !len.is_multiple_of(512) {
        return Err(Error::InvalidArgument(format!(
            "a raw image must be a whole number of 512-byte sectors; the stream has {len} bytes"
        )));
    }
    Ok(())
}

fn import_raw(
    input: &mut Input,
    dst: &Path,
    format: Format,
    opts: &OpenOptions,
) -> Result<ImportSummary> {
    if input.complete() {
        // Refused before anything is created.
        check_raw_len(input.n as u64)?;
    }
    let (file, guard) = create_new(dst)?;
    let io = |e| Error::io(format!("writing {}", dst.display()), e);
    match format {
        Format::Raw => {
            let len = input.drain(&mut |off, b| fileio::write_sparse(&file, b, off).map_err(io))?;
            check_raw_len(len)?;
            file.set_len(len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Format::Qcow2 => {
            let mut writer = FileWriter::new(&file, dst, DEFAULT_CLUSTER_BITS);
            let len = input.drain(&mut |off, b| writer.feed(off, b))?;
            check_raw_len(len)?;
            writer.finish(len)?;
        }
    }
    let virtual_size = open_disk(dst, true, opts)?.size();
    guard.keep();
    Ok(ImportSummary {
        source_format: Format::Raw,
        virtual_size,
    })
}

fn import_qcow2(
    input: &mut Input,
    dst: &Path,
    format: Format,
    opts: &OpenOptions,
) -> Result<ImportSummary> {
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dst
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} names no file", dst.display())))?
        .to_string_lossy()
        .into_owned();
    // Removed when dropped, whatever happens.
    let spool = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".import")
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a spool file in {}", dir.display()), e))?;
    let spool_path = spool.path().to_path_buf();
    let io = |e| {
        Error::io(
            format!("writing the spool file {}", spool_path.display()),
            e,
        )
    };
    let len =
        input.drain(&mut |off, b| fileio::write_sparse(spool.as_file(), b, off).map_err(io))?;
    spool.as_file().set_len(len).map_err(io)?;

    let canonical = std::fs::canonicalize(&spool_path).unwrap_or_else(|_| spool_path.clone());
    let hide = |e| rename_path(e, &[&spool_path, &canonical]);
    if let Some(backing) = stored_backing_name(&spool_path).map_err(hide)? {
        return Err(Error::Backing {
            path: PathBuf::from(STREAM_NAME),
            reason: format!(
                "imported images must be self-contained, and this one names the backing file {backing:?}"
            ),
        });
    }
    let no_backing = OpenOptions {
        allowed_dirs: Vec::new(),
        max_chain: 0,
    };
    let mut src = Qcow2Disk::open(&spool_path, true, &no_backing).map_err(hide)?;
    let size = src.size();
    if !size.is_multiple_of(512) {
        return Err(Error::InvalidArgument(format!(
            "the imported image's virtual size of {size} bytes is not a multiple of 512"
        )));
    }
    check_room(&mut src, dir)?;
    let guard = match format {
        Format::Raw => backend_to_raw(&mut src, dst, &mut |_| {}),
        Format::Qcow2 => backend_to_qcow2(&mut src, dst, &mut |_| {}),
    }
    .map_err(hide)?;
    drop(src);
    let virtual_size = open_disk(dst, true, opts)?.size();
    guard.keep();
    drop(spool);
    Ok(ImportSummary {
        source_format: Format::Qcow2,
        virtual_size,
    })
}

/// Refuses a qcow2 image whose data would not fit in the free space of `dir` once
/// converted: a small image can claim far more (many guest clusters on one host cluster,
/// compressed clusters), and filling the host's disk is not an import's business.
fn check_room(src: &mut Qcow2Disk, dir: &Path) -> Result<()> {
    let size = src.size();
    let mut data = 0u64;
    let mut off = 0u64;
    while off < size {
        let (kind, n) = src.extent(off, size - off)?;
        if n == 0 {
            break;
        }
        if kind == crate::Extent::Data {
            data += n;
        }
        off += n;
    }
    let free = rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| {
            Error::io(
                format!("checking the free space of {}", dir.display()),
                e.into(),
            )
        })?;
    if data > free {
        return Err(Error::InvalidArgument(format!(
            "the imported image holds {data} bytes of data; only {free} bytes are free where it would be stored"
        )));
    }
    Ok(())
}

/// Replaces the spool file's paths in an error by [`STREAM_NAME`].
fn rename_path(e: Error, spool: &[&Path]) -> Error {
    let name = Path::new(STREAM_NAME);
    let fix = |p: PathBuf| {
        if spool.contains(&p.as_path()) {
            name.to_path_buf()
        } else {
            p
        }
    };
    let fix_text = |mut s: String| {
        for p in spool {
            s = s.replace(&*p.to_string_lossy(), STREAM_NAME);
        }
        s
    };
    match e {
        Error::Io { context, source } => Error::Io {
            context: fix_text(context),
            source,
        },
        Error::Invalid { path, reason } => Error::Invalid {
            path: fix(path),
            reason: fix_text(reason),
        },
        Error::Unsupported { path, reason } => Error::Unsupported {
            path: fix(path),
            reason: fix_text(reason),
        },
        Error::Backing { path, reason } => Error::Backing {
            path: fix(path),
            reason: fix_text(reason),
        },
        Error::Corrupt { path, reason } => Error::Corrupt {
            path: fix(path),
            reason: fix_text(reason),
        },
        other => other,
    }
}
