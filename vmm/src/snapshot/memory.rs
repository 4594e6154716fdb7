//! Guest memory in a snapshot: written sparsely, mapped back copy-on-write.
//!
//! Saving skips what costs nothing to skip: pages the guest never touched (not resident, as
//! `mincore` tells) are not even read, and resident pages that hold only zeros are not
//! written; the file is created at full length, so both read back as zeros from its holes.
//! Restoring maps each region of the file `MAP_PRIVATE`: a VM reads the snapshot's pages from
//! the page cache, shared by every VM restored from the same file, and a page it writes
//! becomes its own copy. A clone costs only the pages it writes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::{io_err, SnapshotError};

const PAGE: usize = 4096;
/// Pages examined per `mincore` call (1 MiB of vector for 4 GiB).
const MINCORE_CHUNK: usize = 1 << 18;

/// What [`save`] wrote.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MemoryWritten {
    /// Bytes of guest memory written (non-zero pages).
    pub written: u64,
    /// Bytes of guest memory in all.
    pub total: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // Chunks of 16 bytes: the compiler turns this into wide loads.
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// Resident pages of `[ptr, ptr + len)`, one byte per page (bit 0 set when resident).
fn residency(ptr: *const u8, len: usize) -> Vec<u8> {
    let pages = len.div_ceil(PAGE);
    let mut v = vec![1u8; pages];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(MINCORE_CHUNK);
        // SAFETY: the range is inside a live mapping of guest memory, and `v` has a byte
        // for every page asked about.
        let r = unsafe {
            libc::mincore(
                ptr.add(done * PAGE) as *mut libc::c_void,
                n * PAGE,
                v[done..].as_mut_ptr(),
            )
        };
        if r != 0 {
            // Unknown: treat every page as resident (read them all).
            v[done..done + n].fill(1);
        }
        done += n;
    }
    v
}

/// Writes guest memory into `file` (created empty by the caller), region after region.
pub(crate) fn save(mem: &GuestMemoryMmap, file: &File) -> Result<MemoryWritten, SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)
        .map_err(io_err("sizing the memory file"))?;
    let mut out = MemoryWritten { written: 0, total };
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let ptr = mem
            .get_host_address(region.start_addr())
            .map_err(|e| SnapshotError::Vm(format!("guest memory: {e}")))?;
        let resident = residency(ptr, len);
        // SAFETY: the region is a live mapping of `len` bytes; the vCPUs are paused and the
        // devices locked, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let mut run: Option<usize> = None; // start of a run of pages to write
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let data = resident[i] & 1 != 0 && !is_zero(page);
            match (data, run) {
                (true, None) => run = Some(i * PAGE),
                (false, Some(start)) => {
                    write_run(file, &bytes[start..i * PAGE], file_off + start as u64)?;
                    out.written += (i * PAGE - start) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            write_run(file, &bytes[start..], file_off + start as u64)?;
            out.written += (len - start) as u64;
        }
        file_off += len as u64;
    }
    file.sync_all().map_err(io_err("syncing the memory file"))?;
    Ok(out)
}

fn write_run(file: &File, bytes: &[u8], at: u64) -> Result<(), SnapshotError> {
    file.write_all_at(bytes, at)
        .map_err(io_err("writing the memory file"))
}

/// Guest memory backed by `file` copy-on-write, `regions` laid out one after the other in it.
pub(crate) fn map(file: &File, regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut off = 0u64;
    let mut out = Vec::with_capacity(regions.len());
    for &(gpa, len) in regions {
        let fd = file
            .try_clone()
            .map_err(io_err("duplicating the memory file"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(fd, off)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::Vm(format!("mapping the memory file: {e}")))?;
        out.push(
            GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or_else(|| SnapshotError::Vm("a memory region overflows".into()))?,
        );
        off += len;
    }
    GuestMemoryMmap::from_regions(out)
        .map_err(|e| SnapshotError::Vm(format!("guest memory from the snapshot: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn only_pages_with_data_are_written_and_they_map_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(&[7u8; 100], GuestAddress(0x1234)).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(5 << 20))
            .unwrap();
        // Touched but zero: resident, not written.
        mem.write_obj(0u64, GuestAddress(6 << 20)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let w = save(&mem, &f).unwrap();
        assert_eq!(w.total, 8 << 20);
        assert_eq!(w.written, 2 * PAGE as u64);
        let back = map(&f, &[(0, 8 << 20)]).unwrap();
        let mut buf = [0u8; 100];
        back.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(buf, [7u8; 100]);
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(5 << 20)).unwrap(),
            0xdead_beef
        );
        // Writes stay private to the mapping.
        back.write_obj(1u32, GuestAddress(5 << 20)).unwrap();
        let again = map(&f, &[(0, 8 << 20)]).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(5 << 20)).unwrap(),
            0xdead_beef
        );
    }
}
