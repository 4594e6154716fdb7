//! L1/L2 entries: their bit layout, decoding into cluster mappings, and a small cache of L2
//! tables (metadata is written through, so the cache never holds unwritten changes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::fileio;

/// Offset bits of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly 1 (it may be written in place).
pub(crate) const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;

/// L2 tables kept in memory.
const CACHE_TABLES: usize = 16;

/// What one guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Not allocated: reads fall through to the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (0 if none).
    Zero { host: u64, copied: bool },
    /// Data at host offset `host`; `copied` means its refcount is 1.
    Data { host: u64, copied: bool },
    /// Deflate-compressed data starting at byte `offset`, spanning to the end of the
    /// `sectors`-th 512-byte sector counted from the one holding `offset`.
    Compressed { offset: u64, sectors: u64 },
}

impl Cluster {
    /// Decodes an L2 entry; an error names what is malformed.
    pub fn decode(entry: u64, version: u32, cluster_bits: u32) -> Result<Cluster, String> {
        if entry & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let offset = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            return Ok(Cluster::Compressed { offset, sectors });
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if host & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(format!(
                "L2 entry {entry:#x} points to an unaligned cluster"
            ));
        }
        if version >= 3 && entry & ZERO != 0 {
            return Ok(Cluster::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Data { host, copied })
    }

    /// The host clusters this mapping holds a reference to (as a range of cluster indexes).
    pub fn host_clusters(self, cluster_bits: u32) -> Option<(u64, u64)> {
        match self {
            Cluster::Data { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                Some((host >> cluster_bits, (host >> cluster_bits) + 1))
            }
            Cluster::Compressed { offset, sectors } => {
                let start = offset & !511;
                let end = start + sectors * 512;
                Some((start >> cluster_bits, ((end - 1) >> cluster_bits) + 1))
            }
            _ => None,
        }
    }
}

struct Table {
    offset: u64,
    entries: Vec<u64>,
    used: u64,
}

/// A least-recently-used cache of decoded L2 tables.
pub(crate) struct L2Cache {
    tables: Vec<Table>,
    tick: u64,
    cluster_bits: u32,
}

impl L2Cache {
    pub fn new(cluster_bits: u32) -> Self {
        L2Cache {
            tables: Vec::new(),
            tick: 0,
            cluster_bits,
        }
    }

    fn slot(&mut self, offset: u64, entries: Vec<u64>) -> usize {
        let t = Table {
            offset,
            entries,
            used: self.tick,
        };
        if self.tables.len() < CACHE_TABLES {
            self.tables.push(t);
            return self.tables.len() - 1;
        }
        let victim = self
            .tables
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.used)
            .map(|(i, _)| i)
            .unwrap_or(0);
        self.tables[victim] = t;
        victim
    }

    /// The table at `offset`, read from `file` if it is not cached.
    pub fn get(&mut self, file: &File, offset: u64) -> io::Result<&mut Vec<u64>> {
        self.tick += 1;
        let i = match self.tables.iter().position(|t| t.offset == offset) {
            Some(i) => {
                self.tables[i].used = self.tick;
                i
            }
            None => {
                let mut raw = vec![0u8; 1usize << self.cluster_bits];
                fileio::read_zero_fill(file, &mut raw, offset)?;
                let entries = raw
                    .chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        u64::from_be_bytes(a)
                    })
                    .collect();
                self.slot(offset, entries)
            }
        };
        Ok(&mut self.tables[i].entries)
    }

    /// Records a freshly written table.
    pub fn insert(&mut self, offset: u64, entries: Vec<u64>) {
        self.tick += 1;
        self.tables.retain(|t| t.offset != offset);
        self.slot(offset, entries);
    }

    /// Forgets the table at `offset` (its cluster was freed).
    pub fn forget(&mut self, offset: u64) {
        self.tables.retain(|t| t.offset != offset);
    }

    /// Records a freshly written all-zero table.
    pub fn insert_zeroed(&mut self, offset: u64) {
        self.tick += 1;
        self.tables.retain(|t| t.offset != offset);
        let n = 1usize << (self.cluster_bits - 3);
        self.slot(offset, vec![0; n]);
    }
}

/// Writes entries `lo..hi` of a table at `table_offset` in one write.
pub(crate) fn write_entries(
    file: &File,
    table_offset: u64,
    entries: &[u64],
    lo: usize,
    hi: usize,
) -> io::Result<()> {
    let mut raw = Vec::with_capacity((hi - lo) * 8);
    for e in &entries[lo..hi] {
        raw.extend_from_slice(&e.to_be_bytes());
    }
    file.write_all_at(&raw, table_offset + lo as u64 * 8)
}
