//! Growing a qcow2 image's virtual size.

use std::os::unix::fs::FileExt;

use super::header::{self, MAX_L1_BYTES, OFF_SIZE};
use super::Qcow2Disk;
use crate::error::{Error, Result};

impl Qcow2Disk {
    /// Grows the virtual size to `new_size` bytes (new space reads as zeros, or from the
    /// backing file where it is large enough), moving the L1 table if it must grow.
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
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {new_size} exceeds the maximum {}",
                header::MAX_VIRTUAL_SIZE
            )));
        }
        let cs = self.cluster_size();
        let needed = header::l1_entries_for(new_size, self.cluster_bits);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "virtual size {new_size} needs an L1 table larger than {MAX_L1_BYTES} bytes"
            )));
        }
        let old_len = self.l1.len() as u64;
        if needed <= old_len {
            self.file
                .write_all_at(&new_size.to_be_bytes(), OFF_SIZE)
                .map_err(|e| self.io_err("updating the header of", e))?;
            self.size = new_size;
            return Ok(());
        }
        let old_clusters = (old_len * 8).div_ceil(cs);
        let mut l1 = self.l1.clone();
        l1.resize(needed as usize, 0);
        let mut raw = Vec::with_capacity(l1.len() * 8);
        for e in &l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let fits = self.l1_offset != 0 && needed * 8 <= old_clusters * cs;
        let new_offset = if fits {
            self.file
                .write_all_at(&raw[old_len as usize * 8..], self.l1_offset + old_len * 8)
                .map_err(|e| self.io_err("writing the L1 table of", e))?;
            self.l1_offset
        } else {
            let n = (needed * 8).div_ceil(cs);
            let first = self.rc.alloc(&self.file, n)?;
            self.rc.commit(&self.file)?;
            raw.resize((n * cs) as usize, 0);
            self.file
                .write_all_at(&raw, first * cs)
                .map_err(|e| self.io_err("writing the L1 table of", e))?;
            self.file
                .sync_data()
                .map_err(|e| self.io_err("syncing", e))?;
            first * cs
        };
        // size, crypt_method (0), l1_size, l1_table_offset: one write.
        let mut hdr = [0u8; 24];
        hdr[0..8].copy_from_slice(&new_size.to_be_bytes());
        hdr[12..16].copy_from_slice(&(needed as u32).to_be_bytes());
        hdr[16..24].copy_from_slice(&new_offset.to_be_bytes());
        self.file
            .write_all_at(&hdr, OFF_SIZE)
            .map_err(|e| self.io_err("updating the header of", e))?;
        if !fits && self.l1_offset != 0 {
            for k in 0..old_clusters {
                self.rc.defer_decref(self.l1_offset / cs + k);
            }
        }
        self.l1 = l1;
        self.l1_offset = new_offset;
        self.size = new_size;
        Ok(())
    }
}
