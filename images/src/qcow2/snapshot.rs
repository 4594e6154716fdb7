//! Internal snapshots, as QEMU keeps them: a table of snapshots, each with its own copy of
//! the L1 table; the L2 tables and data clusters they share with the active image have their
//! refcounts raised, and the active image copies a cluster before it writes a shared one
//! (shared clusters lack the COPIED flag, see write.rs).
//!
//! Every step keeps the image safe against a crash (a crash may leak clusters, never free
//! one that is referenced): references are counted before they are made durable, and
//! dropped only once the metadata that held them is durable. `qemu-img snapshot -l` lists
//! what is made here and `qemu-img check` accepts it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::MAX_L1_BYTES;
use super::l2::{self, Cluster, COPIED, OFFSET_MASK};
use super::Qcow2Disk;
use crate::error::{Error, Result};
use crate::OpenOptions;

/// Most internal snapshots an image may have (QEMU's limit).
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// Most extra data bytes per snapshot entry (QEMU's limit).
const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table read (QEMU's limit).
const MAX_TABLE: u64 = 64 << 20;
/// Longest snapshot name accepted here.
const MAX_NAME: usize = 1023;
/// Offsets of the snapshot count and table offset in the header (adjacent: one write).
const OFF_NB_SNAPSHOTS: u64 = 60;

/// One internal snapshot of a qcow2 image, as `qemu-img snapshot -l` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its unique id (a decimal number, as QEMU gives them).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The disk's virtual size when it was taken.
    pub disk_size: u64,
    /// When it was taken (seconds since the Unix epoch, and nanoseconds).
    pub date: (u32, u32),
    /// Bytes of VM state QEMU saved with it (0 for Kiln's).
    pub vm_state_size: u64,
}

/// An entry of the snapshot table.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    l1_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u32,
    /// Extra data, kept as found (vm_state_size_large, disk_size, icount, ...).
    extra: Vec<u8>,
}

impl Entry {
    fn disk_size(&self, current: u64) -> u64 {
        self.extra
            .get(8..16)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .unwrap_or(current)
    }

    fn info(&self, current: u64) -> SnapshotInfo {
        let large = self
            .extra
            .get(0..8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .unwrap_or(0);
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            disk_size: self.disk_size(current),
            date: (self.date_sec, self.date_nsec),
            vm_state_size: large.max(self.vm_state_size.into()),
        }
    }
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// Reads and checks the snapshot table: every entry inside the file and within QEMU's
/// limits, every L1 table aligned and inside the file.
pub(super) fn read_table(
    file: &File,
    path: &Path,
    offset: u64,
    count: u32,
    cluster_bits: u32,
) -> Result<(Vec<Entry>, u64)> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?
        .len();
    let read = |at: u64, n: usize, what: &str| -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        if at.checked_add(n as u64).is_none_or(|end| end > file_len) {
            return Err(invalid(format!(
                "the snapshot table's {what} lies past the end of the file"
            )));
        }
        file.read_exact_at(&mut b, at).map_err(|e| {
            Error::io(
                format!("reading the snapshot table of {}", path.display()),
                e,
            )
        })?;
        Ok(b)
    };
    let cs = 1u64 << cluster_bits;
    let mut entries = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = offset;
    for i in 0..count {
        let h = read(pos, 40, "entry")?;
        let (id_len, name_len, extra_len) = (be16(&h, 12), be16(&h, 14), be32(&h, 36));
        if extra_len > MAX_EXTRA {
            return Err(invalid(format!(
                "snapshot {i} has {extra_len} bytes of extra data"
            )));
        }
        let extra = read(pos + 40, extra_len as usize, "extra data")?;
        let at = pos + 40 + u64::from(extra_len);
        let id = read(at, id_len.into(), "id")?;
        let name = read(at + u64::from(id_len), name_len.into(), "name")?;
        pos = (at + u64::from(id_len) + u64::from(name_len)).div_ceil(8) * 8;
        if pos - offset > MAX_TABLE {
            return Err(invalid("the snapshot table is larger than 64 MiB".into()));
        }
        let e = Entry {
            l1_offset: be64(&h, 0),
            l1_size: be32(&h, 8),
            id: String::from_utf8_lossy(&id).into_owned(),
            name: String::from_utf8_lossy(&name).into_owned(),
            date_sec: be32(&h, 16),
            date_nsec: be32(&h, 20),
            vm_clock_nsec: be64(&h, 24),
            vm_state_size: be32(&h, 32),
            extra,
        };
        let l1_bytes = u64::from(e.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES
            || (e.l1_size > 0
                && (!e.l1_offset.is_multiple_of(cs)
                    || e.l1_offset == 0
                    || e.l1_offset
                        .checked_add(l1_bytes)
                        .is_none_or(|end| end > file_len)))
        {
            return Err(invalid(format!(
                "snapshot {:?} has an L1 table of {} entries at {:#x} outside the file or unaligned",
                e.name, e.l1_size, e.l1_offset
            )));
        }
        entries.push(e);
    }
    Ok((entries, pos - offset))
}

fn encode_table(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        b.extend_from_slice(&e.l1_offset.to_be_bytes());
        b.extend_from_slice(&e.l1_size.to_be_bytes());
        b.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&e.date_sec.to_be_bytes());
        b.extend_from_slice(&e.date_nsec.to_be_bytes());
        b.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&e.vm_state_size.to_be_bytes());
        b.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(e.id.as_bytes());
        b.extend_from_slice(e.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b
}

/// Which way [`Qcow2Disk::count_tree`] moves refcounts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refs {
    Add,
    Drop,
}

impl Qcow2Disk {
    /// The image's internal snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|e| e.info(self.size)).collect()
    }

    fn find_snapshot(&self, name: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|e| e.name == name)
            .or_else(|| self.snapshots.iter().position(|e| e.id == name))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no snapshot named {name:?}",
                    self.path.display()
                ))
            })
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err("syncing", e))
    }

    /// Reads an L1 table (a snapshot's) and checks that it points to aligned L2 tables.
    fn read_l1(&self, offset: u64, size: u32) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; size as usize * 8];
        self.file
            .read_exact_at(&mut raw, offset)
            .map_err(|e| self.io_err("reading a snapshot's L1 table of", e))?;
        raw.chunks_exact(8)
            .map(|c| {
                let e = u64::from_be_bytes(c.try_into().unwrap_or_default());
                if (e & OFFSET_MASK).is_multiple_of(self.cluster_size()) {
                    Ok(e)
                } else {
                    Err(self.corrupt(format!("a snapshot's L1 entry {e:#x} is unaligned")))
                }
            })
            .collect()
    }

    /// Adds or drops one reference to every L2 table and data cluster the tree of `l1`
    /// reaches (as QEMU counts: once per L1 table that reaches a cluster). Dropped references
    /// take effect at once: call it only once no durable metadata refers through `l1`.
    fn count_tree(&mut self, l1: &[u64], how: Refs) -> Result<()> {
        let cs = self.cluster_size();
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let table = self
                .l2
                .get(&self.file, off)
                .map_err(|e| {
                    Error::io(format!("reading an L2 table of {}", self.path.display()), e)
                })?
                .clone();
            for entry in table {
                let m = Cluster::decode(entry, self.version, self.cluster_bits)
                    .map_err(|r| self.corrupt(r))?;
                if let Some((first, end)) = m.host_clusters(self.cluster_bits) {
                    for c in first..end {
                        match how {
                            Refs::Add => self.rc.incref(&self.file, c)?,
                            Refs::Drop => {
                                self.rc.decref(&self.file, c)?;
                            }
                        }
                    }
                }
            }
            match how {
                Refs::Add => self.rc.incref(&self.file, off / cs)?,
                Refs::Drop => {
                    if self.rc.decref(&self.file, off / cs)? {
                        self.l2.forget(off);
                    }
                }
            }
        }
        self.zcache = None;
        Ok(())
    }

    /// Sets the COPIED flag of the active L1 and L2 entries exactly where the cluster's
    /// refcount is 1 (QEMU's rule, which `qemu-img check` enforces): writes may then go in
    /// place there, and copy first everywhere else.
    fn fix_copied(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        for i in 0..self.l1.len() {
            let off = self.l1[i] & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let want = if self.rc.get(&self.file, off / cs)? == 1 {
                off | COPIED
            } else {
                off
            };
            if self.l1[i] != want {
                self.l1[i] = want;
                self.file
                    .write_all_at(&want.to_be_bytes(), self.l1_offset + i as u64 * 8)
                    .map_err(|e| self.io_err("writing the L1 table of", e))?;
            }
            // A table shared with a snapshot is fixed too: its clusters are then shared as
            // well, so its entries lose COPIED, which changes nothing the snapshot reads.
            let mut table = self
                .l2
                .get(&self.file, off)
                .map_err(|e| {
                    Error::io(format!("reading an L2 table of {}", self.path.display()), e)
                })?
                .clone();
            let (mut lo, mut hi) = (usize::MAX, 0);
            for (j, entry) in table.iter_mut().enumerate() {
                let m = Cluster::decode(*entry, self.version, self.cluster_bits)
                    .map_err(|r| self.corrupt(r))?;
                let host = match m {
                    Cluster::Data { host, .. } => host,
                    Cluster::Zero { host, .. } if host != 0 => host,
                    _ => continue,
                };
                let want = if self.rc.get(&self.file, host / cs)? == 1 {
                    *entry | COPIED
                } else {
                    *entry & !COPIED
                };
                if *entry != want {
                    *entry = want;
                    lo = lo.min(j);
                    hi = hi.max(j + 1);
                }
            }
            if lo < hi {
                l2::write_entries(&self.file, off, &table, lo, hi).map_err(|e| {
                    Error::io(format!("writing an L2 table of {}", self.path.display()), e)
                })?;
                self.l2.insert(off, table);
            }
        }
        Ok(())
    }

    /// Replaces the snapshot table with `entries` (new table, then the header, then the old
    /// table freed).
    fn write_table(&mut self, entries: Vec<Entry>) -> Result<()> {
        let cs = self.cluster_size();
        let bytes = encode_table(&entries);
        let new_off = if entries.is_empty() {
            0
        } else {
            let c = self
                .rc
                .alloc(&self.file, (bytes.len() as u64).div_ceil(cs))?;
            self.rc.commit(&self.file)?;
            self.file
                .write_all_at(&bytes, c * cs)
                .map_err(|e| self.io_err("writing the snapshot table of", e))?;
            self.sync()?;
            c * cs
        };
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file
            .write_all_at(&hdr, OFF_NB_SNAPSHOTS)
            .map_err(|e| self.io_err("updating the header of", e))?;
        self.sync()?;
        if self.snapshots_offset != 0 {
            let first = self.snapshots_offset / cs;
            for c in first..first + self.snapshots_len.div_ceil(cs) {
                self.rc.decref(&self.file, c)?;
            }
        }
        self.snapshots = entries;
        self.snapshots_offset = new_off;
        self.snapshots_len = bytes.len() as u64;
        Ok(())
    }

    /// Takes an internal snapshot named `name` of the disk as it is now (after a flush of
    /// every completed write). Fails if the name is taken.
    pub fn create_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(Error::InvalidArgument(format!(
                "a snapshot name has 1 to {MAX_NAME} bytes"
            )));
        }
        if self.snapshots.iter().any(|e| e.name == name) {
            return Err(Error::InvalidArgument(format!(
                "{} has a snapshot named {name:?} already",
                self.path.display()
            )));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument(format!(
                "{} has {MAX_SNAPSHOTS} snapshots, the most an image may have",
                self.path.display()
            )));
        }
        crate::DiskBackend::flush(self)?;
        let cs = self.cluster_size();
        let l1 = self.l1.clone();
        // The snapshot's references first, durable before anything refers through them.
        self.count_tree(&l1, Refs::Add)?;
        self.rc.commit(&self.file)?;
        self.fix_copied()?;
        let l1_bytes: Vec<u8> = self
            .l1
            .iter()
            .flat_map(|e| (e & !COPIED).to_be_bytes())
            .collect();
        let l1_offset = if l1_bytes.is_empty() {
            0
        } else {
            let c = self
                .rc
                .alloc(&self.file, (l1_bytes.len() as u64).div_ceil(cs))?;
            self.rc.commit(&self.file)?;
            self.file
                .write_all_at(&l1_bytes, c * cs)
                .map_err(|e| self.io_err("writing a snapshot's L1 table of", e))?;
            c * cs
        };
        self.sync()?;
        let id = self
            .snapshots
            .iter()
            .filter_map(|e| e.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut extra = Vec::with_capacity(24);
        extra.extend_from_slice(&0u64.to_be_bytes()); // vm_state_size_large
        extra.extend_from_slice(&self.size.to_be_bytes()); // disk_size
        extra.extend_from_slice(&u64::MAX.to_be_bytes()); // icount: none
        let entry = Entry {
            l1_offset,
            l1_size: self.l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
        };
        let info = entry.info(self.size);
        let mut entries = self.snapshots.clone();
        entries.push(entry);
        self.write_table(entries)?;
        self.rc.commit(&self.file)?;
        Ok(info)
    }

    /// Deletes the snapshot `name` (or with that id); clusters only it used are freed.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let i = self.find_snapshot(name)?;
        crate::DiskBackend::flush(self)?;
        let mut entries = self.snapshots.clone();
        let gone = entries.remove(i);
        self.write_table(entries)?;
        // Nothing durable refers to the snapshot's tree any more.
        let l1 = self.read_l1(gone.l1_offset, gone.l1_size)?;
        self.count_tree(&l1, Refs::Drop)?;
        let cs = self.cluster_size();
        let first = gone.l1_offset / cs;
        for c in first..first + (u64::from(gone.l1_size) * 8).div_ceil(cs) {
            self.rc.decref(&self.file, c)?;
        }
        self.fix_copied()?;
        self.rc.commit(&self.file)?;
        self.sync()
    }

    /// Rolls the disk back to snapshot `name` (or with that id): the disk reads as it did
    /// when the snapshot was taken; the snapshot stays. Refused if the disk was resized
    /// since.
    pub fn revert_to_snapshot(&mut self, name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let i = self.find_snapshot(name)?;
        let e = self.snapshots[i].clone();
        if e.disk_size(self.size) != self.size {
            return Err(Error::InvalidArgument(format!(
                "{} was resized since snapshot {name:?} ({} bytes then, {} now)",
                self.path.display(),
                e.disk_size(self.size),
                self.size
            )));
        }
        let snap = self.read_l1(e.l1_offset, e.l1_size)?;
        if snap.len() > self.l1.len() && snap[self.l1.len()..].iter().any(|&x| x != 0) {
            return Err(self.corrupt(format!(
                "snapshot {name:?} maps clusters past the disk's end"
            )));
        }
        crate::DiskBackend::flush(self)?;
        self.count_tree(&snap, Refs::Add)?;
        self.rc.commit(&self.file)?;
        let old = self.l1.clone();
        let mut new: Vec<u64> = snap.iter().map(|e| e & !COPIED).collect();
        new.resize(self.l1.len(), 0);
        let raw: Vec<u8> = new.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file
            .write_all_at(&raw, self.l1_offset)
            .map_err(|e| self.io_err("writing the L1 table of", e))?;
        self.sync()?;
        self.l1 = new;
        self.count_tree(&old, Refs::Drop)?;
        self.fix_copied()?;
        self.rc.commit(&self.file)?;
        self.sync()
    }

    /// Opens snapshot `name` (or with that id) of the image at `path` as a read-only disk:
    /// its content as it was when the snapshot was taken.
    pub fn open_snapshot(path: impl AsRef<Path>, name: &str, opts: &OpenOptions) -> Result<Self> {
        let mut d = Qcow2Disk::open(path, true, opts)?;
        let i = d.find_snapshot(name)?;
        let e = d.snapshots[i].clone();
        d.l1 = d.read_l1(e.l1_offset, e.l1_size)?;
        d.size = e.disk_size(d.size);
        d.l2 = l2::L2Cache::new(d.cluster_bits);
        Ok(d)
    }
}
