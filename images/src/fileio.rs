//! Positional file I/O helpers shared by the formats.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
pub(crate) fn read_zero_fill(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `fallocate(2)` on the range; returns the OS error if the call fails.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Punches a hole (keeping the file size); the range reads as zeros afterwards.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Writes zeros over the range with plain writes, a bounded buffer at a time.
pub(crate) fn write_zeros_plain(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Whether the range `[offset, limit)` of `file` starts with data or with a hole, and where
/// that data or hole ends (at most `limit`, more than `offset`), by `SEEK_DATA`/`SEEK_HOLE`.
/// Bytes past the end of the file count as a hole. When the file system cannot tell, the
/// whole range is data. Requires `offset < limit`.
pub(crate) fn file_extent(file: &File, offset: u64, limit: u64) -> (bool, u64) {
    use rustix::fs::{seek, SeekFrom};
    match seek(file, SeekFrom::Data(offset)) {
        Ok(d) if d > offset => (false, d.min(limit)),
        Ok(_) => match seek(file, SeekFrom::Hole(offset)) {
            Ok(h) if h > offset => (true, h.min(limit)),
            _ => (true, limit),
        },
        // No data at or after `offset`: a hole up to the end of the file and past it.
        Err(rustix::io::Errno::NXIO) => (false, limit),
        Err(_) => (true, limit),
    }
}

/// Block size of sparse writes: all-zero blocks of this size are not written.
pub(crate) const SPARSE_BLOCK: usize = 4096;

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // An OR over each block without early exit vectorizes; the exit is per block.
    buf.chunks(SPARSE_BLOCK)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Writes `buf` at `offset`, leaving out the [`SPARSE_BLOCK`]-sized blocks (aligned to the
/// file offset) that are all zeros, so that a sparse file keeps its holes there. The caller
/// sets the file's length.
pub(crate) fn write_sparse(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut pos = 0usize;
    let mut run: Option<usize> = None;
    while pos < buf.len() {
        let block_end = ((offset + pos as u64) / SPARSE_BLOCK as u64 + 1) * SPARSE_BLOCK as u64;
        let end = ((block_end - offset) as usize).min(buf.len());
        if is_zero(&buf[pos..end]) {
            if let Some(start) = run.take() {
                file.write_all_at(&buf[start..pos], offset + start as u64)?;
            }
        } else if run.is_none() {
            run = Some(pos);
        }
        pos = end;
    }
    if let Some(start) = run {
        file.write_all_at(&buf[start..], offset + start as u64)?;
    }
    Ok(())
}
