//! Creating new, empty qcow2 images.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{self, Header, MAX_L1_BYTES};
use super::{refcount, Qcow2Disk, NEW_REFCOUNT_ORDER};
use crate::error::{Error, Result};
use crate::Format;

impl Qcow2Disk {
    /// Creates a new, empty version 3 image of `size` bytes (rounded up to a multiple of 512)
    /// with clusters of `1 << cluster_bits` bytes
    /// ([`DEFAULT_CLUSTER_BITS`](super::DEFAULT_CLUSTER_BITS) is the usual choice),
    /// optionally on top of a backing file. The backing path is stored as given: a
    /// relative path is taken relative to the new image's directory when it is opened. Fails
    /// if `path` exists. Open the image with [`Qcow2Disk::open`].
    pub fn create(
        path: impl AsRef<Path>,
        size: u64,
        cluster_bits: u32,
        backing: Option<(&Path, Format)>,
    ) -> Result<()> {
        let path = path.as_ref();
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::InvalidArgument(format!(
                "cluster_bits {cluster_bits} out of range {}..={}",
                header::MIN_CLUSTER_BITS,
                header::MAX_CLUSTER_BITS
            )));
        }
        if size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} exceeds the maximum {}",
                header::MAX_VIRTUAL_SIZE
            )));
        }
        let size = size.div_ceil(512) * 512;
        let cs = 1u64 << cluster_bits;
        let l1_size = header::l1_entries_for(size, cluster_bits);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} needs an L1 table larger than {MAX_L1_BYTES} bytes with {cs}-byte clusters"
            )));
        }
        // An empty disk has no L1 table at all, as QEMU makes it (growing it allocates one).
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let per_block = cs * 8 / (1 << NEW_REFCOUNT_ORDER);
        // Layout: header, refcount table, refcount blocks, L1 table.
        let (mut rt_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + rt_clusters + blocks + l1_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_rt = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_rt == rt_clusters {
                break;
            }
            blocks = need_blocks;
            rt_clusters = need_rt;
        }
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let (backing_file, backing_format) = match backing {
            Some((p, f)) => {
                let name = p.to_str().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "backing file path {} is not UTF-8",
                        p.display()
                    ))
                })?;
                (Some(name.to_string()), Some(f.name().to_string()))
            }
            None => (None, None),
        };
        let hdr = Header {
            version: 3,
            cluster_bits,
            size,
            l1_size: l1_size as u32,
            l1_table_offset: if l1_size == 0 {
                0
            } else {
                (1 + rt_clusters + blocks) * cs
            },
            refcount_table_offset: cs,
            refcount_table_clusters: rt_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            autoclear_features: 0,
            refcount_order: NEW_REFCOUNT_ORDER,
            backing_file,
            backing_format,
        };
        let header_cluster = hdr.encode_new()?;

        let mut table = vec![0u8; (rt_clusters * cs) as usize];
        for b in 0..blocks {
            let off = (1 + rt_clusters + b) * cs;
            table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
        }
        let mut block_data = vec![0u8; (blocks * cs) as usize];
        for c in 0..total {
            let b = (c / per_block) as usize;
            let idx = (c % per_block) as usize;
            refcount::entry_set(
                &mut block_data[b * cs as usize..(b + 1) * cs as usize],
                NEW_REFCOUNT_ORDER,
                idx,
                1,
            );
        }

        let io = |e| Error::io(format!("creating qcow2 image {}", path.display()), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        let write = || -> std::io::Result<()> {
            file.set_len(total * cs)?;
            file.write_all_at(&header_cluster, 0)?;
            file.write_all_at(&table, cs)?;
            file.write_all_at(&block_data, (1 + rt_clusters) * cs)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        Ok(())
    }
}
