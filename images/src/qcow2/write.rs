//! The write path: copy-on-write cluster allocation, L2 updates, zeroing and discarding, and
//! the deferred release of clusters no longer referenced.

use std::os::unix::fs::FileExt;

use super::l2::{self, Cluster, COPIED, ZERO};
use super::{Qcow2Disk, MAX_PENDING_FREES, ZERO_CHUNK};
use crate::backend::{check_range, DiskBackend};
use crate::error::{Error, Result};

/// Data clusters reserved by the first refill after a flush (2 MiB with 64 KiB clusters).
pub(super) const RESERVE_MIN: u64 = 32;

/// Most bytes one refill reserves (what a crash can leak at most).
const RESERVE_MAX_BYTES: u64 = 64 << 20;

/// One cluster's part of a write.
struct Step {
    /// Guest cluster index.
    vc: u64,
    /// Offset of the write inside the cluster, and its length.
    in_off: usize,
    len: usize,
    /// Offset of the step's bytes in the caller's buffer.
    data_off: usize,
    /// Host offset of the cluster written.
    host: u64,
    /// `Some(base)`: a partial write to a new cluster, whose other bytes come from `base`.
    merge: Option<Cluster>,
    /// The new L2 entry, if it changes.
    new_entry: Option<u64>,
    /// A mapping whose host clusters lose a reference once the new entry is written.
    release: Option<Cluster>,
}

impl Qcow2Disk {
    /// Drops one reference to each host cluster of `m`, once the metadata that no longer
    /// refers to them is durable.
    fn release(&mut self, m: Cluster) -> Result<()> {
        if let Some((first, end)) = m.host_clusters(self.cluster_bits) {
            if matches!(m, Cluster::Compressed { .. }) {
                self.zcache = None;
            }
            for c in first..end {
                self.rc.defer_decref(c);
            }
        }
        Ok(())
    }

    /// The L2 table for L1 index `l1i`, ready to be written: allocated (zeroed) if there is
    /// none, copied first if a snapshot shares it (its L1 entry is not COPIED).
    fn ensure_l2(&mut self, l1i: u64) -> Result<u64> {
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return Err(self.corrupt(format!("L1 index {l1i} beyond the L1 table")));
        };
        let old = l1e & l2::OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let cs = self.cluster_size();
        // A shared table's copy keeps its entries: the data clusters it maps are counted
        // once per tree that reaches them, so their refcounts do not change.
        let entries = if old != 0 {
            let table = self.l2.get(&self.file, old).map(|t| t.clone());
            Some(table.map_err(|e| self.io_err("reading an L2 table of", e))?)
        } else {
            None
        };
        let c = self.rc.alloc(&self.file, 1)?;
        self.rc.flush(&self.file)?;
        let off = c * cs;
        let raw = match &entries {
            Some(t) => t.iter().flat_map(|e| e.to_be_bytes()).collect(),
            None => vec![0u8; cs as usize],
        };
        self.file
            .write_all_at(&raw, off)
            .map_err(|e| self.io_err("writing a new L2 table of", e))?;
        // The table and its refcount are durable before the L1 entry points to it.
        self.file
            .sync_data()
            .map_err(|e| self.io_err("syncing", e))?;
        let e = off | COPIED;
        self.file
            .write_all_at(&e.to_be_bytes(), self.l1_offset + l1i * 8)
            .map_err(|e| self.io_err("writing the L1 table of", e))?;
        self.l1[l1i as usize] = e;
        match entries {
            Some(t) => {
                self.l2.insert(off, t);
                // The active image's reference to the shared table goes at the next sync.
                self.rc.defer_decref(old / cs);
            }
            None => self.l2.insert_zeroed(off),
        }
        Ok(off)
    }

    /// Writes `data` at `pos`, all inside the range of one L2 table.
    pub(super) fn write_chunk(&mut self, data: &[u8], pos: u64) -> Result<()> {
        let cs = self.cluster_size();
        let l2_mask = (1u64 << self.l2_bits()) - 1;
        let first_vc = pos >> self.cluster_bits;
        let l2_off = self.ensure_l2(first_vc >> self.l2_bits())?;

        let mut steps: Vec<Step> = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let p = pos + done as u64;
            let vc = p >> self.cluster_bits;
            let in_off = (p & (cs - 1)) as usize;
            let len = (cs as usize - in_off).min(data.len() - done);
            let full = len == cs as usize;
            let (_, m) = self.lookup(vc)?;
            let mut step = Step {
                vc,
                in_off,
                len,
                data_off: done,
                host: 0,
                merge: None,
                new_entry: None,
                release: None,
            };
            match m {
                Cluster::Data { host, copied: true } => step.host = host,
                Cluster::Zero { host, copied: true } if host != 0 => {
                    // A preallocated zero cluster: reuse it, writing it whole.
                    step.host = host;
                    step.merge = (!full).then_some(m);
                    step.new_entry = Some(host | COPIED);
                }
                _ => {
                    let c = self.take_data_cluster()?;
                    step.host = c * cs;
                    step.merge = (!full).then_some(m);
                    step.new_entry = Some(step.host | COPIED);
                    step.release = m.host_clusters(self.cluster_bits).map(|_| m);
                }
            }
            steps.push(step);
            done += len;
        }
        // New clusters' refcounts are durable before anything refers to them.
        self.rc.commit(&self.file)?;

        // Data.
        let mut i = 0;
        while i < steps.len() {
            if let Some(base) = steps[i].merge {
                let s = &steps[i];
                let (vc, in_off, len, data_off, host) = (s.vc, s.in_off, s.len, s.data_off, s.host);
                let entry = self.entry(vc)?;
                let mut buf = self.cluster_contents(vc, entry, base)?;
                buf[in_off..in_off + len].copy_from_slice(&data[data_off..data_off + len]);
                self.file
                    .write_all_at(&buf, host)
                    .map_err(|e| self.io_err("writing", e))?;
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < steps.len()
                && steps[j].merge.is_none()
                && steps[j].host == steps[j - 1].host + cs
            {
                j += 1;
            }
            let start = steps[i].data_off;
            let end = steps[j - 1].data_off + steps[j - 1].len;
            self.file
                .write_all_at(&data[start..end], steps[i].host + steps[i].in_off as u64)
                .map_err(|e| self.io_err("writing", e))?;
            i = j;
        }

        // L2 entries.
        let changed: Vec<(usize, u64)> = steps
            .iter()
            .filter_map(|s| s.new_entry.map(|e| ((s.vc & l2_mask) as usize, e)))
            .collect();
        if let (Some(lo), Some(hi)) = (
            changed.iter().map(|c| c.0).min(),
            changed.iter().map(|c| c.0).max(),
        ) {
            let table = self.l2.get(&self.file, l2_off).map_err(|e| {
                Error::io(format!("reading an L2 table of {}", self.path.display()), e)
            })?;
            for &(idx, e) in &changed {
                table[idx] = e;
            }
            l2::write_entries(&self.file, l2_off, table, lo, hi + 1).map_err(|e| {
                Error::io(format!("writing an L2 table of {}", self.path.display()), e)
            })?;
        }

        // Old clusters lose their references last.
        for s in &steps {
            if let Some(old) = s.release {
                self.release(old)?;
            }
        }
        self.maybe_free_pending()
    }

    /// A data cluster for a write: from the reservation, whose refcounts the caller's
    /// commit makes durable once per refill instead of once per write. Each refill while
    /// writes keep allocating is twice the last, up to [`RESERVE_MAX_BYTES`]: a sync
    /// writes back the file's dirty data too, so few of them is what makes a fresh image
    /// fast to fill.
    fn take_data_cluster(&mut self) -> Result<u64> {
        if self.reserved.is_empty() {
            // At most half a refcount block's span, so that a refcount block the
            // allocation needs always fits beside it.
            let cap = (self.rc.block_entries() / 2)
                .min(RESERVE_MAX_BYTES >> self.cluster_bits)
                .max(1);
            let want = self.reserve_next.min(cap);
            let (c, n) = self.rc.alloc_up_to(&self.file, want)?;
            self.reserved = c..c + n;
            self.reserve_next = (want * 2).min(cap);
        }
        let c = self.reserved.start;
        self.reserved.start += 1;
        Ok(c)
    }

    /// Gives back the clusters reserved and not used (a crash before this only leaks them).
    pub(super) fn release_reserved(&mut self) -> Result<()> {
        self.reserve_next = RESERVE_MIN;
        for c in std::mem::replace(&mut self.reserved, 0..0) {
            self.rc.decref(&self.file, c)?;
        }
        Ok(())
    }

    /// Syncs the file, then applies the queued reference drops (whose metadata is now
    /// durable) and syncs again so that the freed space is durable too.
    pub(super) fn sync_and_free(&mut self) -> Result<()> {
        self.rc.flush(&self.file)?;
        self.file
            .sync_data()
            .map_err(|e| self.io_err("syncing", e))?;
        if self.rc.pending() > 0 {
            self.rc.free_pending(&self.file)?;
            self.file
                .sync_data()
                .map_err(|e| self.io_err("syncing", e))?;
        }
        Ok(())
    }

    /// Applies queued reference drops once enough of them have gathered.
    fn maybe_free_pending(&mut self) -> Result<()> {
        if self.rc.pending() >= MAX_PENDING_FREES {
            self.sync_and_free()
        } else {
            Ok(())
        }
    }

    /// Makes `count` whole guest clusters from `first` read as zeros, freeing their host
    /// clusters: unallocated without a backing file, the zero flag with one (version 3).
    fn zero_clusters(&mut self, first: u64, count: u64) -> Result<()> {
        let l2_bits = self.l2_bits();
        let l2_mask = (1u64 << l2_bits) - 1;
        let use_flag = self.backing.is_some();
        let new = if use_flag { ZERO } else { 0 };
        let mut vc = first;
        let end = first + count;
        while vc < end {
            let l1i = vc >> l2_bits;
            let chunk_end = ((l1i + 1) << l2_bits).min(end);
            let l2_off = match (self.l2_offset(l1i), use_flag) {
                (0, false) => {
                    vc = chunk_end;
                    continue;
                }
                _ => self.ensure_l2(l1i)?,
            };
            let (lo, hi) = (
                (vc & l2_mask) as usize,
                ((chunk_end - 1) & l2_mask) as usize + 1,
            );
            let version = self.version;
            let cluster_bits = self.cluster_bits;
            let table = self.l2.get(&self.file, l2_off).map_err(|e| {
                Error::io(format!("reading an L2 table of {}", self.path.display()), e)
            })?;
            let mut olds = Vec::new();
            let mut bad = None;
            let (mut clo, mut chi) = (usize::MAX, 0);
            for (idx, slot) in table.iter_mut().enumerate().take(hi).skip(lo) {
                if *slot == new {
                    continue;
                }
                match Cluster::decode(*slot, version, cluster_bits) {
                    Ok(m) => olds.push(m),
                    Err(r) => {
                        bad = Some(r);
                        break;
                    }
                }
                *slot = new;
                clo = clo.min(idx);
                chi = chi.max(idx + 1);
            }
            if clo < chi {
                l2::write_entries(&self.file, l2_off, table, clo, chi).map_err(|e| {
                    Error::io(format!("writing an L2 table of {}", self.path.display()), e)
                })?;
            }
            if let Some(r) = bad {
                return Err(self.corrupt(r));
            }
            for m in olds {
                self.release(m)?;
            }
            self.maybe_free_pending()?;
            vc = chunk_end;
        }
        Ok(())
    }

    /// Writes zeros as data over `[offset, offset + len)`, a bounded buffer at a time.
    fn write_zero_data(&mut self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = ZERO_CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Makes the range read as zeros, deallocating whole clusters.
    pub(super) fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = offset + len;
        if self.version < 3 && self.backing.is_some() {
            // No zero flag in version 2: unallocating would expose the backing file.
            return self.write_zero_data(offset, len);
        }
        let first_full = offset.div_ceil(cs) * cs;
        // The disk's last, partial cluster counts as whole when the range reaches its end.
        let last_full = if end == self.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if first_full >= last_full {
            return self.write_zero_data(offset, len);
        }
        if offset < first_full {
            self.write_zero_data(offset, first_full - offset)?;
        }
        if last_full < end {
            self.write_zero_data(last_full, end - last_full)?;
        }
        self.zero_clusters(first_full / cs, (last_full - first_full) / cs)
    }
}
