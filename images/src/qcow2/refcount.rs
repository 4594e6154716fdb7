//! Refcounts: the refcount table, a small write-back cache of refcount blocks (flushed before
//! anything refers to a new cluster), cluster allocation and freeing, and growing the table.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use crate::error::{Error, Result};
use crate::fileio;

/// Refcount blocks kept in memory.
const CACHE_BLOCKS: usize = 16;
/// Host offsets stop at 2^56 (the L1/L2 entry offset fields).
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Reserved low bits of a refcount table entry.
const RT_RESERVED: u64 = 0x1ff;

struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: Option<(usize, usize)>,
    used: u64,
}

/// Reads one refcount of width `1 << order` bits at `idx` in a refcount block.
pub(crate) fn entry_get(data: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            ((data[bit / 8] >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
        }
        3 => data[idx] as u64,
        4 => u16::from_be_bytes([data[idx * 2], data[idx * 2 + 1]]) as u64,
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&data[idx * 4..idx * 4 + 4]);
            u32::from_be_bytes(a) as u64
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[idx * 8..idx * 8 + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes one refcount; returns the byte range of the block that changed.
pub(crate) fn entry_set(data: &mut [u8], order: u32, idx: usize, value: u64) -> (usize, usize) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let byte = &mut data[bit / 8];
            *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
            (bit / 8, bit / 8 + 1)
        }
        3 => {
            data[idx] = value as u8;
            (idx, idx + 1)
        }
        4 => {
            data[idx * 2..idx * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (idx * 2, idx * 2 + 2)
        }
        5 => {
            data[idx * 4..idx * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes());
            (idx * 4, idx * 4 + 4)
        }
        _ => {
            data[idx * 8..idx * 8 + 8].copy_from_slice(&value.to_be_bytes());
            (idx * 8, idx * 8 + 8)
        }
    }
}

/// The refcount structures of one open image.
pub(crate) struct Refcounts {
    path: PathBuf,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    cluster_bits: u32,
    order: u32,
    /// log2 of the number of refcounts in one block.
    block_bits: u32,
    cache: Vec<Block>,
    tick: u64,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Clusters to drop a reference to once the metadata that dropped them is durable.
    pending: Vec<u64>,
    /// Allocation scans stop here (a little past the end of the file, refreshed as it grows).
    scan_limit: u64,
}

impl Refcounts {
    /// Reads and validates the refcount table.
    pub fn load(
        file: &File,
        path: &Path,
        table_offset: u64,
        table_clusters: u32,
        cluster_bits: u32,
        order: u32,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters as u64 * cs;
        let mut raw = vec![0u8; bytes as usize];
        fileio::read_zero_fill(file, &mut raw, table_offset).map_err(|e| {
            Error::io(
                format!("reading the refcount table of {}", path.display()),
                e,
            )
        })?;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            let e = u64::from_be_bytes(a);
            if e & RT_RESERVED != 0 || !e.is_multiple_of(cs) || e >= MAX_HOST_OFFSET {
                return Err(Error::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "refcount table entry {i} ({e:#x}) is not a cluster-aligned offset"
                    ),
                });
            }
            table.push(e);
        }
        Ok(Refcounts {
            path: path.to_path_buf(),
            table,
            table_offset,
            table_clusters: table_clusters as u64,
            cluster_bits,
            order,
            block_bits: cluster_bits + 3 - order,
            cache: Vec::new(),
            tick: 0,
            free_hint: 0,
            scan_limit: 0,
            pending: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{what} in {}", self.path.display()), e)
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// Index into `cache` of the block at `offset`, loading it (and evicting) as needed.
    fn block(&mut self, file: &File, offset: u64) -> Result<usize> {
        self.tick += 1;
        if let Some(i) = self.cache.iter().position(|b| b.offset == offset) {
            self.cache[i].used = self.tick;
            return Ok(i);
        }
        let mut data = vec![0u8; self.cs() as usize];
        fileio::read_zero_fill(file, &mut data, offset)
            .map_err(|e| self.io_err("reading a refcount block", e))?;
        self.insert_block(file, offset, data)
    }

    fn insert_block(&mut self, file: &File, offset: u64, data: Vec<u8>) -> Result<usize> {
        let block = Block {
            offset,
            data,
            dirty: None,
            used: self.tick,
        };
        if self.cache.len() < CACHE_BLOCKS {
            self.cache.push(block);
            return Ok(self.cache.len() - 1);
        }
        let victim = self
            .cache
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.used)
            .map(|(i, _)| i)
            .unwrap_or(0);
        self.write_back(file, victim)?;
        self.cache[victim] = block;
        Ok(victim)
    }

    fn write_back(&mut self, file: &File, i: usize) -> Result<()> {
        let b = &mut self.cache[i];
        if let Some((lo, hi)) = b.dirty.take() {
            let res = file.write_all_at(&b.data[lo..hi], b.offset + lo as u64);
            if let Err(e) = res {
                b.dirty = Some((lo, hi));
                return Err(self.io_err("writing a refcount block", e));
            }
        }
        Ok(())
    }

    /// Writes every changed refcount to the file; returns whether anything was written.
    pub fn flush(&mut self, file: &File) -> Result<bool> {
        let mut wrote = false;
        for i in 0..self.cache.len() {
            wrote |= self.cache[i].dirty.is_some();
            self.write_back(file, i)?;
        }
        Ok(wrote)
    }

    /// Makes new refcounts durable before anything may refer to the clusters they count:
    /// writes them, and syncs if anything was written.
    pub fn commit(&mut self, file: &File) -> Result<()> {
        if self.flush(file)? {
            file.sync_data()
                .map_err(|e| self.io_err("syncing refcounts", e))?;
        }
        Ok(())
    }

    /// Queues a reference drop for when the metadata that no longer refers to `cluster` is
    /// durable (see [`Refcounts::free_pending`]).
    pub fn defer_decref(&mut self, cluster: u64) {
        self.pending.push(cluster);
    }

    /// How many reference drops are queued.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Applies the queued reference drops. Call only once the metadata updates that removed
    /// those references are durable (after a sync), so that a crash can only leak clusters.
    pub fn free_pending(&mut self, file: &File) -> Result<()> {
        while let Some(c) = self.pending.pop() {
            if let Err(e) = self.decref(file, c) {
                self.pending.clear();
                return Err(e);
            }
        }
        self.flush(file)?;
        Ok(())
    }

    /// The refcount of host cluster `cluster` (0 where no block covers it).
    pub fn get(&mut self, file: &File, cluster: u64) -> Result<u64> {
        let ti = cluster >> self.block_bits;
        let Some(&off) = self.table.get(ti as usize) else {
            return Ok(0);
        };
        if off == 0 {
            return Ok(0);
        }
        let bi = self.block(file, off)?;
        let idx = (cluster & ((1u64 << self.block_bits) - 1)) as usize;
        Ok(entry_get(&self.cache[bi].data, self.order, idx))
    }

    /// Sets the refcount of `cluster`, creating refcount blocks and growing the table as
    /// needed; new metadata is placed outside the cluster range `avoid` (clusters being
    /// allocated whose refcounts are not set yet).
    fn set(&mut self, file: &File, cluster: u64, value: u64, avoid: (u64, u64)) -> Result<()> {
        if value > self.max_value() {
            return Err(self.corrupt(format!(
                "refcount of cluster {cluster} would overflow {} bits",
                1u32 << self.order
            )));
        }
        let avoid = (avoid.0.min(cluster), avoid.1.max(cluster + 1));
        let ti = (cluster >> self.block_bits) as usize;
        if ti >= self.table.len() {
            self.grow_table(file, ti as u64 + 1, avoid)?;
        }
        if self.table[ti] == 0 {
            self.create_block(file, ti, avoid)?;
        }
        let bi = self.block(file, self.table[ti])?;
        let idx = (cluster & ((1u64 << self.block_bits) - 1)) as usize;
        let order = self.order;
        let b = &mut self.cache[bi];
        let (lo, hi) = entry_set(&mut b.data, order, idx, value);
        b.dirty = Some(match b.dirty {
            Some((l, h)) => (l.min(lo), h.max(hi)),
            None => (lo, hi),
        });
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Clusters one refcount block counts.
    pub fn block_entries(&self) -> u64 {
        1 << self.block_bits
    }

    /// Allocates `n` contiguous free clusters (refcount 1) and returns the first's index.
    /// The new refcounts are cached: [`Refcounts::flush`] before anything refers to them.
    pub fn alloc(&mut self, file: &File, n: u64) -> Result<u64> {
        Ok(self.alloc_run(file, n, true)?.0)
    }

    /// Allocates the first run of free clusters, at most `n` long (so that freed holes are
    /// reused); returns its first cluster and length.
    pub fn alloc_up_to(&mut self, file: &File, n: u64) -> Result<(u64, u64)> {
        self.alloc_run(file, n, false)
    }

    /// Allocates a run of free clusters: exactly `n` when `exact`, else the first free run
    /// cut to `n`. The new refcounts are cached, as for [`Refcounts::alloc`].
    fn alloc_run(&mut self, file: &File, n: u64, exact: bool) -> Result<(u64, u64)> {
        // Refcounts only ever cover clusters inside the file, bar a few leaked by a crash
        // between an allocation and its write: a scan far past the end means the refcounts
        // are corrupt (and would otherwise make the scan run for ever).
        let slack = n + (1u64 << (self.cluster_bits - 3)) * 4 + 1024;
        let mut c = self.free_hint;
        let mut run_start = c;
        let mut run_len = 0;
        let mut first_free = None;
        while run_len < n {
            if c >= self.scan_limit {
                // Past the last known limit: look at the file's length again.
                let file_len = file
                    .metadata()
                    .map_err(|e| self.io_err("reading the length", e))?
                    .len();
                self.scan_limit = (file_len.div_ceil(self.cs()) + slack)
                    .min(MAX_HOST_OFFSET >> self.cluster_bits);
            }
            if c >= self.scan_limit && !exact && run_len > 0 {
                break;
            }
            if c >= self.scan_limit {
                return Err(self.corrupt(
                    "no free cluster: refcounts claim clusters far past the end of the file".into(),
                ));
            }
            if self.get(file, c)? == 0 {
                if run_len == 0 {
                    run_start = c;
                }
                first_free.get_or_insert(c);
                run_len += 1;
            } else if !exact && run_len > 0 {
                break;
            } else {
                run_len = 0;
            }
            c += 1;
        }
        let n = run_len;
        // Every cluster scanned before the first free one is in use. (Set before the
        // refcounts below, which may free the old refcount table and lower the hint.)
        self.free_hint = match first_free {
            Some(f) if f < run_start => f,
            _ => run_start + n,
        };
        let avoid = (run_start, run_start + n);
        for k in 0..n {
            self.set(file, run_start + k, 1, avoid)?;
        }
        Ok((run_start, n))
    }

    /// Increments the refcount of `cluster` (a snapshot starts sharing it).
    pub fn incref(&mut self, file: &File, cluster: u64) -> Result<()> {
        let v = self.get(file, cluster)?;
        if v == 0 {
            return Err(self.corrupt(format!(
                "cluster {cluster} is referenced but its refcount is 0"
            )));
        }
        self.set(file, cluster, v + 1, (cluster, cluster + 1))
    }

    /// Decrements the refcount of `cluster`; a cluster that becomes free is punched out of the
    /// file (best effort). Returns whether it became free.
    pub fn decref(&mut self, file: &File, cluster: u64) -> Result<bool> {
        let v = self.get(file, cluster)?;
        if v == 0 {
            return Err(self.corrupt(format!(
                "cluster {cluster} is referenced but its refcount is already 0"
            )));
        }
        self.set(file, cluster, v - 1, (cluster, cluster + 1))?;
        if v == 1 {
            let cs = self.cs();
            let _ = fileio::punch_hole(file, cluster * cs, cs);
        }
        Ok(v == 1)
    }

    /// Creates the refcount block for table index `ti`, placed inside the range it covers
    /// (which is all free, as no block covers it yet) and counting itself.
    fn create_block(&mut self, file: &File, ti: usize, avoid: (u64, u64)) -> Result<()> {
        let n = 1u64 << self.block_bits;
        let base = (ti as u64) << self.block_bits;
        let b = if base < avoid.0 || base >= avoid.1 {
            base
        } else if avoid.1 < base + n {
            avoid.1
        } else {
            return Err(self.corrupt(format!(
                "no room for refcount block {ti} outside an allocation of {} clusters",
                avoid.1 - avoid.0
            )));
        };
        let cs = self.cs();
        let mut data = vec![0u8; cs as usize];
        entry_set(&mut data, self.order, (b - base) as usize, 1);
        file.write_all_at(&data, b * cs)
            .map_err(|e| self.io_err("writing a new refcount block", e))?;
        file.sync_data()
            .map_err(|e| self.io_err("syncing a new refcount block", e))?;
        let off = b * cs;
        file.write_all_at(&off.to_be_bytes(), self.table_offset + ti as u64 * 8)
            .map_err(|e| self.io_err("writing the refcount table", e))?;
        self.table[ti] = off;
        self.tick += 1;
        self.insert_block(file, off, data)?;
        Ok(())
    }

    /// Moves the refcount table to a larger one with at least `min_entries` entries, placed
    /// past every cluster the old table covers (and past `avoid`), together with the refcount
    /// blocks that count the new table's own clusters.
    fn grow_table(&mut self, file: &File, min_entries: u64, avoid: (u64, u64)) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let per_block = 1u64 << self.block_bits;
        let old_len = self.table.len() as u64;
        let start = (old_len * per_block).max(avoid.1);
        let mut entries = min_entries.max(old_len * 2).max(1);
        let mut nblocks = 0u64;
        let (first_ti, last_ti, tclusters) = loop {
            let t = entries.div_ceil(per_cluster);
            let end = start + nblocks + t;
            let first = start / per_block;
            let last = (end - 1) / per_block;
            let need_blocks = last - first + 1;
            let need_entries = entries.max(last + 1);
            if need_blocks <= nblocks && need_entries <= entries {
                break (first, last, t);
            }
            nblocks = nblocks.max(need_blocks);
            entries = need_entries;
        };
        if tclusters * cs > MAX_REFTABLE_BYTES {
            return Err(self.corrupt(format!(
                "refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        let table_start = start + nblocks;
        let mut new_table = self.table.clone();
        new_table.resize((tclusters * per_cluster) as usize, 0);

        // The new blocks, in memory, counting the clusters they and the table occupy.
        let mut blocks: Vec<Vec<u8>> = (first_ti..=last_ti)
            .map(|_| vec![0u8; cs as usize])
            .collect();
        let used =
            (start..start + (last_ti - first_ti + 1)).chain(table_start..table_start + tclusters);
        for x in used {
            let ti = x / per_block;
            let idx = (x % per_block) as usize;
            entry_set(&mut blocks[(ti - first_ti) as usize], self.order, idx, 1);
        }
        for (j, data) in blocks.iter().enumerate() {
            let off = (start + j as u64) * cs;
            file.write_all_at(data, off)
                .map_err(|e| self.io_err("writing a new refcount block", e))?;
            new_table[(first_ti + j as u64) as usize] = off;
        }
        let mut raw = Vec::with_capacity(new_table.len() * 8);
        for e in &new_table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        file.write_all_at(&raw, table_start * cs)
            .map_err(|e| self.io_err("writing the new refcount table", e))?;
        file.sync_data()
            .map_err(|e| self.io_err("syncing the new refcount table", e))?;
        let mut hdr = [0u8; 12];
        hdr[0..8].copy_from_slice(&(table_start * cs).to_be_bytes());
        hdr[8..12].copy_from_slice(&(tclusters as u32).to_be_bytes());
        file.write_all_at(&hdr, OFF_REFTABLE)
            .map_err(|e| self.io_err("updating the header", e))?;

        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters;
        self.table = new_table;
        self.table_offset = table_start * cs;
        self.table_clusters = tclusters;
        for (j, data) in blocks.into_iter().enumerate() {
            self.tick += 1;
            self.insert_block(file, (start + j as u64) * cs, data)?;
        }
        for k in 0..old_clusters {
            self.defer_decref(old_offset / cs + k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let n = 512 * 8 / bits as usize;
            let mut data = vec![0u8; 512];
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                entry_set(&mut data, order, i, v);
            }
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(entry_get(&data, order, i), v, "order {order} index {i}");
            }
            let (lo, hi) = entry_set(&mut data, order, 3, 1);
            assert!(lo < hi && hi <= data.len());
            assert_eq!(entry_get(&data, order, 3), 1);
        }
        // Sub-byte refcounts fill bytes from the least significant bit, as QEMU does.
        let mut data = vec![0u8; 1];
        entry_set(&mut data, 0, 0, 1);
        entry_set(&mut data, 0, 3, 1);
        assert_eq!(data[0], 0b0000_1001);
    }
}
