//! qcow2 images (version 3 read and write; version 2 read and write without zero clusters).
//!
//! Supported: cluster allocation with refcounts kept consistent (the refcount table grows as
//! needed), zero clusters, reading compressed (zlib) clusters, backing files (raw or qcow2,
//! read-only, recursively) with copy-on-write of whole clusters, growing the virtual size.
//! Internal snapshots: create, list, delete, roll back, and read one (see `snapshot`).
//! Not supported: encryption, external data files, extended L2 entries, zstd compression,
//! writing images that have the dirty/corrupt bits set.
//!
//! Metadata is written through in an order that keeps the image consistent at every step
//! except for leaks, with a sync wherever a later write must not reach the disk before an
//! earlier one: refcounts of new clusters first (synced), then the data, then the L2 entry
//! (a new L2 table is synced before the L1 entry that points to it). Clusters that are no
//! longer referenced lose their reference only after the next sync (at `flush`, on close,
//! or when a few thousand have queued). A crash, even a power loss, can leak clusters but
//! never leave a referenced cluster free.

mod backing;
mod create;
mod header;
mod l2;
mod refcount;
mod resize;
mod snapshot;
pub(crate) mod stream;
mod write;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backend::{check_range, DiskBackend, Extent};
use crate::error::{Error, Result};
use crate::{fileio, Format, OpenOptions};
pub use header::MAGIC;
use header::{Header, OFF_AUTOCLEAR};
use l2::{Cluster, L2Cache, OFFSET_MASK};
use refcount::Refcounts;
pub use snapshot::SnapshotInfo;

/// The cluster size (as a power of two) that [`Qcow2Disk::create`] callers usually want: 64 KiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// The refcount width of new images (as a power of two): 16 bits, as QEMU does.
const NEW_REFCOUNT_ORDER: u32 = 4;

/// Freed clusters queued before a sync makes their release safe and they are reused.
const MAX_PENDING_FREES: usize = 4096;

/// Largest zero buffer used when zeros must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// Reads and validates the header of the qcow2 image at `path` and returns the name of the
/// backing file it names, if any, without opening anything else.
pub(crate) fn stored_backing_name(path: &Path) -> Result<Option<String>> {
    let file = File::open(path)
        .map_err(|e| Error::io(format!("opening qcow2 image {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?
        .len();
    Ok(Header::read(&file, len, path)?.backing_file)
}

/// How one layer of a chain maps a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Data,
    Zero,
    Unallocated,
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    path: PathBuf,
    file: File,
    read_only: bool,
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    l2: L2Cache,
    rc: Refcounts,
    backing: Option<Box<dyn DiskBackend>>,
    backing_name: Option<String>,
    /// The backing file's canonical path and format, when there is one.
    backing_resolved: Option<(PathBuf, Format)>,
    /// The last decompressed cluster, keyed by its L2 entry.
    zcache: Option<(u64, Vec<u8>)>,
    /// Data clusters allocated ahead (refcount 1, durable, not yet referenced), so that one
    /// refcount sync covers many allocating writes; given back at every flush.
    reserved: std::ops::Range<u64>,
    /// Clusters the next refill reserves: doubles while writes keep allocating, back to
    /// the minimum at every flush.
    reserve_next: u64,
    /// The internal snapshots, and where their table is and how long it is.
    snapshots: Vec<snapshot::Entry>,
    snapshots_offset: u64,
    snapshots_len: u64,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("cluster_bits", &self.cluster_bits)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("backing", &self.backing_name)
            .finish()
    }
}

impl Qcow2Disk {
    /// Opens a qcow2 image. Its backing chain is opened read-only, each backing file
    /// resolved relative to the directory of the image naming it and refused unless it lies
    /// in one of `opts.allowed_dirs`; chains deeper than `opts.max_chain` and loops are
    /// refused.
    pub fn open(path: impl AsRef<Path>, read_only: bool, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("opening qcow2 image {}", path.display()), e))?;
        let mut chain = vec![canonical.clone()];
        Self::open_in_chain(&canonical, read_only, opts, &mut chain)
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        read_only: bool,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("opening qcow2 image {}", path.display()), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?
            .len();
        let hdr = Header::read(&file, file_len, path)?;
        let unsupported = |reason: &str| Error::Unsupported {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !read_only {
            if hdr.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                return Err(unsupported(
                    "the image is marked dirty (lazy refcounts); repair it with `qemu-img check -r all` or open it read-only",
                ));
            }
            if hdr.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                return Err(unsupported(
                    "the image is marked corrupt; it can only be opened read-only",
                ));
            }
        }
        let cs = 1u64 << hdr.cluster_bits;

        let mut raw = vec![0u8; hdr.l1_size as usize * 8];
        fileio::read_zero_fill(&file, &mut raw, hdr.l1_table_offset)
            .map_err(|e| Error::io(format!("reading the L1 table of {}", path.display()), e))?;
        let mut l1 = Vec::with_capacity(hdr.l1_size as usize);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_be_bytes(a);
            if !(e & OFFSET_MASK).is_multiple_of(cs) {
                return Err(Error::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("L1 entry {i} ({e:#x}) points to an unaligned L2 table"),
                });
            }
            l1.push(e);
        }
        drop(raw);

        let rc = Refcounts::load(
            &file,
            path,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            hdr.cluster_bits,
            hdr.refcount_order,
        )?;

        let (snapshots, snapshots_len) = snapshot::read_table(
            &file,
            path,
            hdr.snapshots_offset,
            hdr.nb_snapshots,
            hdr.cluster_bits,
        )?;

        let (backing, backing_resolved) = match &hdr.backing_file {
            Some(name) => {
                let (disk, resolved, format) =
                    backing::open_backing(path, name, hdr.backing_format.as_deref(), opts, chain)?;
                (Some(disk), Some((resolved, format)))
            }
            None => (None, None),
        };

        if !read_only && hdr.version == 3 && hdr.autoclear_features != 0 {
            // Autoclear features (bitmaps and the like) are not maintained here: clear them.
            file.write_all_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)
                .map_err(|e| Error::io(format!("updating the header of {}", path.display()), e))?;
        }

        Ok(Qcow2Disk {
            path: path.to_path_buf(),
            file,
            read_only,
            version: hdr.version,
            cluster_bits: hdr.cluster_bits,
            size: hdr.size,
            l1_offset: hdr.l1_table_offset,
            l1,
            l2: L2Cache::new(hdr.cluster_bits),
            rc,
            backing,
            backing_name: hdr.backing_file,
            backing_resolved,
            zcache: None,
            reserved: 0..0,
            reserve_next: write::RESERVE_MIN,
            snapshots,
            snapshots_offset: if hdr.nb_snapshots > 0 {
                hdr.snapshots_offset
            } else {
                0
            },
            snapshots_len,
        })
    }

    /// The image file's path (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The backing file name stored in the image, if any.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's canonical path (as resolved when the image was opened), if any.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing_resolved.as_ref().map(|(p, _)| p.as_path())
    }

    /// The backing file's format (as recorded in the image, or detected), if any.
    pub fn backing_format(&self) -> Option<Format> {
        self.backing_resolved.as_ref().map(|(_, f)| *f)
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{what} {}", self.path.display()), e)
    }

    /// What this image itself (not its backing file) maps the bytes from `offset` to, and
    /// where the run of clusters mapped the same way ends (at most `end`).
    fn layer_run(&mut self, offset: u64, end: u64) -> Result<(Layer, u64)> {
        let l2_bits = self.l2_bits();
        let layer = |m: Cluster| match m {
            Cluster::Data { .. } | Cluster::Compressed { .. } => Layer::Data,
            Cluster::Zero { .. } => Layer::Zero,
            Cluster::Unallocated => Layer::Unallocated,
        };
        let mut vc = offset >> self.cluster_bits;
        let first = layer(self.lookup(vc)?.1);
        loop {
            // Without an L2 table, the whole range of the table is unallocated.
            let next = if self.l2_offset(vc >> l2_bits) == 0 {
                ((vc >> l2_bits) + 1) << l2_bits
            } else {
                vc + 1
            };
            let next_pos = next << self.cluster_bits;
            if next_pos >= end {
                return Ok((first, end));
            }
            vc = next;
            if layer(self.lookup(vc)?.1) != first {
                return Ok((first, next_pos));
            }
        }
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    /// Host offset of the L2 table covering L1 index `l1i` (0 if none).
    fn l2_offset(&self, l1i: u64) -> u64 {
        self.l1
            .get(l1i as usize)
            .map(|e| e & OFFSET_MASK)
            .unwrap_or(0)
    }

    /// The L2 entry of guest cluster `vc` (0 where no L2 table exists).
    fn entry(&mut self, vc: u64) -> Result<u64> {
        let l1i = vc >> self.l2_bits();
        let off = self.l2_offset(l1i);
        if off == 0 {
            return Ok(0);
        }
        let idx = (vc & ((1u64 << self.l2_bits()) - 1)) as usize;
        let table = self
            .l2
            .get(&self.file, off)
            .map_err(|e| Error::io(format!("reading an L2 table of {}", self.path.display()), e))?;
        Ok(table[idx])
    }

    fn lookup(&mut self, vc: u64) -> Result<(u64, Cluster)> {
        let e = self.entry(vc)?;
        let c = Cluster::decode(e, self.version, self.cluster_bits).map_err(|r| self.corrupt(r))?;
        Ok((e, c))
    }

    /// Reads from the backing file, zeros past its end or without one.
    fn read_backing(&mut self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        if pos >= bsize {
            buf.fill(0);
            return Ok(());
        }
        let n = (bsize - pos).min(buf.len() as u64) as usize;
        b.read_at(&mut buf[..n], pos)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// The decompressed contents of a compressed cluster.
    fn decompress(&mut self, entry: u64, offset: u64, sectors: u64) -> Result<&[u8]> {
        if self.zcache.as_ref().map(|(e, _)| *e) != Some(entry) {
            let cs = self.cluster_size() as usize;
            let end = (offset & !511) + sectors * 512;
            let mut input = vec![0u8; (end - offset) as usize];
            fileio::read_zero_fill(&self.file, &mut input, offset)
                .map_err(|e| self.io_err("reading a compressed cluster of", e))?;
            let mut out = vec![0u8; cs];
            let mut z = flate2::Decompress::new(false);
            let ok = z
                .decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                .is_ok();
            if !ok || z.total_out() != cs as u64 {
                return Err(self.corrupt(format!(
                    "compressed cluster at {offset:#x} does not inflate to a full cluster"
                )));
            }
            self.zcache = Some((entry, out));
        }
        Ok(self
            .zcache
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[]))
    }

    /// The full current contents of guest cluster `vc` mapped by `m` (for copy-on-write).
    fn cluster_contents(&mut self, vc: u64, entry: u64, m: Cluster) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        match m {
            Cluster::Unallocated => self.read_backing(&mut buf, vc * cs)?,
            Cluster::Zero { .. } => {}
            Cluster::Data { host, .. } => fileio::read_zero_fill(&self.file, &mut buf, host)
                .map_err(|e| self.io_err("reading", e))?,
            Cluster::Compressed { offset, sectors } => {
                buf.copy_from_slice(self.decompress(entry, offset, sectors)?)
            }
        }
        Ok(buf)
    }
}

impl DiskBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (cs - 1);
            let first_len = ((cs - in_off) as usize).min(buf.len() - done);
            let (entry, m) = self.lookup(vc)?;
            if let Cluster::Compressed {
                offset: co,
                sectors,
            } = m
            {
                let data = self.decompress(entry, co, sectors)?;
                buf[done..done + first_len]
                    .copy_from_slice(&data[in_off as usize..in_off as usize + first_len]);
                done += first_len;
                continue;
            }
            // Extend over following clusters of the same kind (contiguous for data).
            let mut run = first_len;
            let mut next = vc + 1;
            while done + run < buf.len() {
                let (_, m2) = self.lookup(next)?;
                let same = match (m, m2) {
                    (Cluster::Data { host: h, .. }, Cluster::Data { host: h2, .. }) => {
                        h2 == h + (next - vc) * cs
                    }
                    (Cluster::Zero { .. }, Cluster::Zero { .. }) => true,
                    (Cluster::Unallocated, Cluster::Unallocated) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
                run += (cs as usize).min(buf.len() - done - run);
                next += 1;
            }
            let part = &mut buf[done..done + run];
            match m {
                Cluster::Data { host, .. } => {
                    fileio::read_zero_fill(&self.file, part, host + in_off)
                        .map_err(|e| self.io_err("reading", e))?
                }
                Cluster::Zero { .. } => part.fill(0),
                _ => self.read_backing(part, pos)?,
            }
            done += run;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let span_bits = self.l2_bits() + self.cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let table_end = ((pos >> span_bits) + 1) << span_bits;
            let n = ((table_end - pos) as usize).min(buf.len() - done);
            self.write_chunk(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // A flush ends a burst of writes: what was reserved for it goes back.
        self.release_reserved()?;
        self.sync_and_free()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_snapshot(&mut self, name: &str) -> Result<()> {
        Qcow2Disk::create_snapshot(self, name).map(|_| ())
    }

    fn extent(&mut self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok((Extent::Data, 0));
        }
        let (layer, run_end) = self.layer_run(offset, offset + len)?;
        let n = run_end - offset;
        Ok(match layer {
            Layer::Data => (Extent::Data, n),
            Layer::Zero => (Extent::Zero, n),
            Layer::Unallocated => match self.backing.as_mut() {
                None => (Extent::Zero, n),
                Some(b) => {
                    let bsize = b.size();
                    if offset >= bsize {
                        (Extent::Zero, n)
                    } else {
                        b.extent(offset, n.min(bsize - offset))?
                    }
                }
            },
        })
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.release_reserved().and_then(|()| self.sync_and_free()) {
                tracing::warn!("closing {}: {e}", self.path.display());
            }
        }
    }
}
