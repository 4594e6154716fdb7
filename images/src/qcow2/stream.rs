//! Writing whole qcow2 images in one sequential pass, for copies, imports and exports.
//!
//! Once it is known which guest clusters hold data (a [`DataMap`]), all the metadata can be
//! laid out at once: refcounts (every cluster of the image counted once), an L1 table, an L2
//! table for each range that holds data, and the data clusters in guest order. Nothing is
//! ever read back or rewritten, so an image can be written into a stream that cannot seek.
//!
//! Two layouts of the same structures:
//! - metadata first ([`write_stream`]): header, refcount table, refcount blocks, L1, L2
//!   tables, data. The map must be made by a first pass over the source.
//! - data first ([`FileWriter`]): header cluster (written last), data clusters appended as
//!   they are found, then L2 tables, L1, refcount table and blocks. One pass over the source;
//!   the destination is a file.
//!
//! Images are version 3 with 16-bit refcounts and no backing file; clusters that read as
//! zeros are left unallocated.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{self, Header, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use super::l2::COPIED;
use super::{refcount, NEW_REFCOUNT_ORDER};
use crate::backend::DiskBackend;
use crate::error::{Error, Result};
use crate::fileio;

/// Data clusters are read from the source at most this many bytes at a time.
const READ_CHUNK: u64 = 1 << 20;

/// Host offsets must fit the offset field of L1 and L2 entries.
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Which guest clusters hold data: a bitmap for each L2 table's range that holds any, so
/// that memory follows the data, not the virtual size.
#[derive(Debug)]
pub(crate) struct DataMap {
    cluster_bits: u32,
    spans: BTreeMap<u64, Vec<u64>>,
    count: u64,
}

impl DataMap {
    pub fn new(cluster_bits: u32) -> Self {
        DataMap {
            cluster_bits,
            spans: BTreeMap::new(),
            count: 0,
        }
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    /// Records that guest cluster `vc` holds data.
    pub fn set(&mut self, vc: u64) {
        let l2_bits = self.l2_bits();
        let words = self
            .spans
            .entry(vc >> l2_bits)
            .or_insert_with(|| vec![0; 1 << (l2_bits - 6)]);
        let idx = (vc & ((1 << l2_bits) - 1)) as usize;
        let bit = 1u64 << (idx % 64);
        if words[idx / 64] & bit == 0 {
            words[idx / 64] |= bit;
            self.count += 1;
        }
    }

    /// Records the clusters of `buf` (the disk's bytes at `offset`, a multiple of the
    /// cluster size) that are not all zeros.
    pub fn mark(&mut self, offset: u64, buf: &[u8]) {
        let cs = 1usize << self.cluster_bits;
        let first = offset >> self.cluster_bits;
        for (i, piece) in buf.chunks(cs).enumerate() {
            if !fileio::is_zero(piece) {
                self.set(first + i as u64);
            }
        }
    }

    /// How many clusters hold data.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// How many L2 tables the image needs.
    fn tables(&self) -> u64 {
        self.spans.len() as u64
    }

    /// The guest clusters that hold data of the L2 table `span`, in order.
    fn in_span<'s>(&self, span: u64, words: &'s [u64]) -> impl Iterator<Item = u64> + 's {
        let base = span << self.l2_bits();
        words.iter().enumerate().flat_map(move |(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(base + w as u64 * 64 + b)
            })
        })
    }

    /// Every guest cluster that holds data, in order.
    pub fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.spans
            .iter()
            .flat_map(move |(&span, words)| self.in_span(span, words))
    }
}

/// Where everything goes: the first cluster of each part of the image.
#[derive(Debug)]
struct Plan {
    cluster_bits: u32,
    size: u64,
    l1_entries: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_clusters: u64,
    rt_start: u64,
    rb_start: u64,
    l1_start: u64,
    l2_start: u64,
    data_start: u64,
    total: u64,
}

/// Where the bytes of an image go, in order.
type Put<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

impl Plan {
    /// Lays out an image of `size` bytes (rounded up to a multiple of 512) holding the data
    /// clusters of `map`.
    fn new(map: &DataMap, size: u64, data_first: bool) -> Result<Plan> {
        let cluster_bits = map.cluster_bits;
        let cs = 1u64 << cluster_bits;
        if size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} exceeds the qcow2 maximum {}",
                header::MAX_VIRTUAL_SIZE
            )));
        }
        let size = size.div_ceil(512) * 512;
        let l1_entries = header::l1_entries_for(size, cluster_bits);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} needs an L1 table larger than {MAX_L1_BYTES} bytes with {cs}-byte clusters"
            )));
        }
        if let Some(&last) = map.spans.keys().next_back() {
            if last >= l1_entries {
                return Err(Error::InvalidArgument(format!(
                    "data mapped past the virtual size of {size} bytes"
                )));
            }
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let fixed = 1 + l1_clusters + map.tables() + map.count();
        let per_block = (cs * 8) >> NEW_REFCOUNT_ORDER;
        let (mut rt_clusters, mut rb_clusters) = (1u64, 1u64);
        loop {
            let total = fixed + rt_clusters + rb_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_rt = (need_blocks * 8).div_ceil(cs);
            if need_blocks == rb_clusters && need_rt == rt_clusters {
                break;
            }
            rb_clusters = need_blocks;
            rt_clusters = need_rt;
        }
        let total = fixed + rt_clusters + rb_clusters;
        if rt_clusters * cs > MAX_REFTABLE_BYTES || total >= MAX_HOST_OFFSET >> cluster_bits {
            return Err(Error::InvalidArgument(format!(
                "an image of {total} clusters of {cs} bytes is too large"
            )));
        }
        let tables = map.tables();
        let (rt_start, rb_start, l1_start, l2_start, data_start) = if data_first {
            let data_start = 1;
            let l2_start = data_start + map.count();
            let l1_start = l2_start + tables;
            let rt_start = l1_start + l1_clusters;
            (
                rt_start,
                rt_start + rt_clusters,
                l1_start,
                l2_start,
                data_start,
            )
        } else {
            let rt_start = 1;
            let rb_start = rt_start + rt_clusters;
            let l1_start = rb_start + rb_clusters;
            let l2_start = l1_start + l1_clusters;
            (rt_start, rb_start, l1_start, l2_start, l2_start + tables)
        };
        Ok(Plan {
            cluster_bits,
            size,
            l1_entries,
            l1_clusters,
            rt_clusters,
            rb_clusters,
            rt_start,
            rb_start,
            l1_start,
            l2_start,
            data_start,
            total,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The header cluster.
    fn header(&self) -> Result<Vec<u8>> {
        Header {
            version: 3,
            cluster_bits: self.cluster_bits,
            size: self.size,
            l1_size: self.l1_entries as u32,
            l1_table_offset: if self.l1_entries == 0 {
                0
            } else {
                self.l1_start * self.cs()
            },
            refcount_table_offset: self.rt_start * self.cs(),
            refcount_table_clusters: self.rt_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            autoclear_features: 0,
            refcount_order: NEW_REFCOUNT_ORDER,
            backing_file: None,
            backing_format: None,
        }
        .encode_new()
    }

    fn refcount_table(&self, put: Put) -> Result<()> {
        let cs = self.cs();
        let entries = (0..self.rb_clusters).map(|i| (i, (self.rb_start + i) * cs));
        put_table(self.rt_clusters, cs, entries, put)
    }

    fn refcount_blocks(&self, put: Put) -> Result<()> {
        let cs = self.cs();
        let per_block = (cs * 8) >> NEW_REFCOUNT_ORDER;
        let mut block = vec![0u8; cs as usize];
        for b in 0..self.rb_clusters {
            block.fill(0);
            let first = b * per_block;
            let n = self.total.saturating_sub(first).min(per_block);
            for idx in 0..n as usize {
                refcount::entry_set(&mut block, NEW_REFCOUNT_ORDER, idx, 1);
            }
            put(&block)?;
        }
        Ok(())
    }

    fn l1_table(&self, map: &DataMap, put: Put) -> Result<()> {
        let cs = self.cs();
        let entries = map
            .spans
            .keys()
            .enumerate()
            .map(|(rank, &span)| (span, ((self.l2_start + rank as u64) * cs) | COPIED));
        put_table(self.l1_clusters, cs, entries, put)
    }

    fn l2_tables(&self, map: &DataMap, put: Put) -> Result<()> {
        let cs = self.cs();
        let mask = (1u64 << (self.cluster_bits - 3)) - 1;
        let mut next = self.data_start;
        for (&span, words) in &map.spans {
            let entries = map.in_span(span, words).map(|vc| {
                let e = (vc & mask, (next * cs) | COPIED);
                next += 1;
                e
            });
            put_table(1, cs, entries, put)?;
        }
        Ok(())
    }
}

/// Puts `clusters` clusters of 64-bit big-endian table entries, `entries` giving the
/// non-zero ones as (index, value) in increasing index order.
fn put_table(
    clusters: u64,
    cs: u64,
    entries: impl Iterator<Item = (u64, u64)>,
    put: Put,
) -> Result<()> {
    let per = cs / 8;
    let mut buf = vec![0u8; cs as usize];
    let mut entries = entries.peekable();
    for c in 0..clusters {
        buf.fill(0);
        while let Some(&(i, v)) = entries.peek() {
            if i >= (c + 1) * per {
                break;
            }
            let at = ((i - c * per) * 8) as usize;
            buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
            entries.next();
        }
        put(&buf)?;
    }
    Ok(())
}

/// Writes an image holding the bytes of `src` (a virtual size of `src.size()` rounded up to
/// 512 bytes) into `out`, strictly in order: metadata first, then the data clusters of
/// `map`, read from `src` again. `map` must hold every cluster of `src` that is not all
/// zeros. `progress` gets the bytes written so far; returns how many were written.
pub(crate) fn write_stream(
    src: &mut dyn DiskBackend,
    map: &DataMap,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let plan = Plan::new(map, src.size(), false)?;
    let cs = plan.cs();
    let mut written = 0u64;
    let mut put = |b: &[u8]| -> Result<()> {
        out.write_all(b)
            .map_err(|e| Error::io("writing the qcow2 stream", e))?;
        written += b.len() as u64;
        progress(written);
        Ok(())
    };
    put(&plan.header()?)?;
    plan.refcount_table(&mut put)?;
    plan.refcount_blocks(&mut put)?;
    plan.l1_table(map, &mut put)?;
    plan.l2_tables(map, &mut put)?;

    // Data: runs of consecutive clusters, a bounded buffer at a time.
    let size = src.size();
    let max_run = (READ_CHUNK / cs).max(1);
    let mut buf = vec![0u8; (max_run * cs) as usize];
    let mut clusters = map.clusters().peekable();
    while let Some(first) = clusters.next() {
        let mut n = 1;
        while n < max_run && clusters.peek() == Some(&(first + n)) {
            clusters.next();
            n += 1;
        }
        let start = first * cs;
        let len = (n * cs) as usize;
        let have = size.saturating_sub(start).min(n * cs) as usize;
        src.read_at(&mut buf[..have], start)?;
        buf[have..len].fill(0);
        put(&buf[..len])?;
    }
    debug_assert_eq!(written, plan.total * cs);
    Ok(written)
}

/// Writes a new image into an empty file in one pass: feed it the disk's bytes in order,
/// then [`FileWriter::finish`] it.
pub(crate) struct FileWriter<'a> {
    file: &'a File,
    path: &'a Path,
    map: DataMap,
    /// The host cluster the next data cluster goes to.
    next: u64,
    /// Guest bytes fed so far.
    fed: u64,
    /// A feed ended in a partial cluster: it was the end of the disk.
    ended: bool,
}

impl<'a> FileWriter<'a> {
    /// A writer of an image with clusters of `1 << cluster_bits` bytes into `file` (at
    /// `path`, named in errors), which must be empty.
    pub fn new(file: &'a File, path: &'a Path, cluster_bits: u32) -> Self {
        FileWriter {
            file,
            path,
            map: DataMap::new(cluster_bits),
            next: 1,
            fed: 0,
            ended: false,
        }
    }

    fn cs(&self) -> u64 {
        1 << self.map.cluster_bits
    }

    fn io_err(&self, e: std::io::Error) -> Error {
        Error::io(format!("writing qcow2 image {}", self.path.display()), e)
    }

    /// Takes the disk's bytes at `offset`, a multiple of the cluster size at or past the end
    /// of what was fed before (bytes skipped read as zeros). Clusters that are not all zeros
    /// are written; only the disk's last bytes may end in a partial cluster.
    pub fn feed(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let cs = self.cs();
        if self.ended || !offset.is_multiple_of(cs) || offset < self.fed {
            return Err(Error::InvalidArgument(format!(
                "qcow2 writer fed out of order at offset {offset}"
            )));
        }
        let cs = cs as usize;
        let first = offset / cs as u64;
        let mut run: Option<usize> = None;
        let flush = |w: &mut Self, from: usize, to: usize| -> Result<()> {
            w.file
                .write_all_at(&buf[from..to], w.next * cs as u64)
                .map_err(|e| w.io_err(e))?;
            for i in (from..to).step_by(cs) {
                w.map.set(first + (i / cs) as u64);
            }
            w.next += (to - from).div_ceil(cs) as u64;
            Ok(())
        };
        let mut i = 0;
        while i < buf.len() {
            let end = (i + cs).min(buf.len());
            if fileio::is_zero(&buf[i..end]) {
                if let Some(s) = run.take() {
                    flush(self, s, i)?;
                }
            } else if run.is_none() {
                run = Some(i);
            }
            i = end;
        }
        if let Some(s) = run {
            // A partial last cluster: the metadata after it leaves the rest a hole.
            flush(self, s, buf.len())?;
        }
        self.fed = offset + buf.len() as u64;
        self.ended = !buf.len().is_multiple_of(cs);
        Ok(())
    }

    /// Writes the metadata for a disk of `size` bytes (at least what was fed) and the
    /// header, and syncs the file.
    pub fn finish(self, size: u64) -> Result<()> {
        if size < self.fed {
            return Err(Error::InvalidArgument(format!(
                "qcow2 writer: size {size} is smaller than the {} bytes written",
                self.fed
            )));
        }
        let plan = Plan::new(&self.map, size, true)?;
        debug_assert_eq!(plan.data_start + self.map.count(), self.next);
        let cs = plan.cs();
        let mut pos = plan.l2_start * cs;
        let file = self.file;
        let mut put = |b: &[u8]| -> Result<()> {
            file.write_all_at(b, pos).map_err(|e| self.io_err(e))?;
            pos += b.len() as u64;
            Ok(())
        };
        plan.l2_tables(&self.map, &mut put)?;
        plan.l1_table(&self.map, &mut put)?;
        plan.refcount_table(&mut put)?;
        plan.refcount_blocks(&mut put)?;
        debug_assert_eq!(pos, plan.total * cs);
        let header = plan.header()?;
        file.write_all_at(&header, 0).map_err(|e| self.io_err(e))?;
        file.set_len(plan.total * cs).map_err(|e| self.io_err(e))?;
        file.sync_all().map_err(|e| self.io_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawDisk;

    fn qemu_img_ok(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (qemu-utils) is needed");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// 512-byte clusters, so that a small disk needs several clusters of L1 table,
    /// refcount table and refcount blocks, in both layouts.
    #[test]
    fn multi_cluster_metadata_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let cb = 9;
        let size = 24u64 << 20;
        let raw_path = dir.path().join("src.raw");
        let mut content = vec![0u8; size as usize];
        for (i, c) in content.chunks_mut(512).enumerate() {
            // Every other cluster holds data, and every 1000th run is longer.
            if i % 2 == 0 || i % 1000 < 10 {
                c.fill((i % 251 + 1) as u8);
            }
        }
        // A long run of zeros, and a last cluster that is partly data.
        content[8 << 20..12 << 20].fill(0);
        content[size as usize - 100..].fill(0);
        std::fs::write(&raw_path, &content).unwrap();
        let mut src = RawDisk::open(&raw_path, true).unwrap();

        let mut map = DataMap::new(cb);
        for off in (0..size).step_by(1 << 20) {
            map.mark(off, &content[off as usize..(off + (1 << 20)) as usize]);
        }
        let plan = Plan::new(&map, size, false).unwrap();
        assert!(plan.rt_clusters > 1 && plan.rb_clusters > 64 && plan.l1_clusters > 1);

        let streamed = dir.path().join("stream.qcow2");
        let mut out = Vec::new();
        let n = write_stream(&mut src, &map, &mut out, &mut |_| {}).unwrap();
        assert_eq!(n, out.len() as u64);
        std::fs::write(&streamed, &out).unwrap();

        let filed = dir.path().join("file.qcow2");
        let file = std::fs::File::create_new(&filed).unwrap();
        let mut w = FileWriter::new(&file, &filed, cb);
        // Fed in uneven but cluster-aligned pieces, with a gap of zeros skipped.
        let mut off = 0u64;
        for (k, len) in [4096u64, 1 << 20, 512, 3 << 20].iter().cycle().enumerate() {
            if off >= size {
                break;
            }
            let end = (off + len).min(size);
            // Some pieces of zeros are not fed at all.
            if k % 2 == 0 || content[off as usize..end as usize].iter().any(|&b| b != 0) {
                w.feed(off, &content[off as usize..end as usize]).unwrap();
            }
            off = end;
        }
        assert!(w.feed(0, &content[..512]).is_err(), "out of order");
        w.finish(size).unwrap();
        drop(file);

        for img in [&streamed, &filed] {
            let img = img.to_str().unwrap();
            qemu_img_ok(&["check", "-f", "qcow2", img]);
            qemu_img_ok(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img,
                raw_path.to_str().unwrap(),
            ]);
        }
        let mut d = crate::open_disk(&filed, true, &Default::default()).unwrap();
        assert_eq!(d.size(), size);
        let mut buf = vec![0u8; 5000];
        d.read_at(&mut buf, 777_777).unwrap();
        assert_eq!(buf[..], content[777_777..782_777]);
    }
}
