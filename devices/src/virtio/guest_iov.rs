//! A request's guest buffers as host iovecs, so that disk data moves between an image file and
//! guest memory in one `preadv`/`pwritev`, with no copy through a buffer of ours.
//!
//! The iovecs hold raw pointers into guest memory and no Rust reference is ever made to those
//! bytes: the guest may change them at any time (that can only garble its own request).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// At most this many pieces per request (Linux's `IOV_MAX`); a longer request takes the
/// copying path.
const IOV_MAX: usize = 1024;

/// Host iovecs over a request's guest buffers.
pub(crate) struct GuestIovecs {
    iov: Vec<libc::iovec>,
    len: usize,
}

impl GuestIovecs {
    /// The bytes of the descriptors of one direction of `chain` (device-writable ones when
    /// `writable`), less `skip_front` bytes at the start and `skip_back` at the end. `None`
    /// when a buffer lies outside guest memory, the bytes are fewer than the skips, or there
    /// are more than [`IOV_MAX`] pieces.
    pub(crate) fn of_chain(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        skip_front: usize,
        skip_back: usize,
    ) -> Option<GuestIovecs> {
        let bufs: Vec<(GuestAddress, usize)> = chain
            .filter(|d| d.is_write_only() == writable)
            .map(|d| (d.addr(), d.len() as usize))
            .collect();
        let total = bufs
            .iter()
            .try_fold(0usize, |a, (_, l)| a.checked_add(*l))?;
        let end = total.checked_sub(skip_back)?;
        if skip_front > end {
            return None;
        }
        let mut iov = Vec::with_capacity(bufs.len());
        let mut pos = 0usize;
        for (addr, len) in bufs {
            // This buffer holds bytes [pos, pos + len) of the direction; keep what lies in
            // [skip_front, end).
            let (start, stop) = (pos.max(skip_front), (pos + len).min(end));
            let buf_start = pos;
            pos += len;
            if start >= stop {
                continue;
            }
            let addr = addr.checked_add((start - buf_start) as u64)?;
            // The device writes what the guest will read, and reads what it wrote.
            let access = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            for slice in mem.get_slices(addr, stop - start, access).ok()? {
                let slice = slice.ok()?;
                if iov.len() == IOV_MAX {
                    return None;
                }
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Some(GuestIovecs {
            iov,
            len: end - skip_front,
        })
    }

    /// How many bytes they cover.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Fills them with the file's bytes at `offset`; bytes past the file's end read as zeros.
    pub(crate) fn read_from(mut self, file: &File, offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        let mut first = 0usize;
        while first < self.iov.len() {
            let pos = offset_at(offset, done)?;
            let rest = &self.iov[first..];
            // SAFETY: every iovec points into guest memory mapped for as long as `mem`, which
            // the caller holds; preadv writes at most iov_len bytes to each.
            let n =
                unsafe { libc::preadv(file.as_raw_fd(), rest.as_ptr(), rest.len() as i32, pos) };
            match n {
                0 => {
                    // The file ends here (truncated behind our back): the rest reads as zeros.
                    for v in &self.iov[first..] {
                        // SAFETY: as above; the bytes are guest memory of iov_len bytes.
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                    return Ok(());
                }
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => {
                    done += n as usize;
                    first = advance(&mut self.iov, first, n as usize);
                }
            }
        }
        Ok(())
    }

    /// Writes their bytes to the file at `offset`.
    pub(crate) fn write_to(mut self, file: &File, offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        let mut first = 0usize;
        while first < self.iov.len() {
            let pos = offset_at(offset, done)?;
            let rest = &self.iov[first..];
            // SAFETY: every iovec points into mapped guest memory (see `read_from`); pwritev
            // only reads iov_len bytes from each.
            let n =
                unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr(), rest.len() as i32, pos) };
            match n {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => {
                    done += n as usize;
                    first = advance(&mut self.iov, first, n as usize);
                }
            }
        }
        Ok(())
    }
}

/// `offset + done` as an `off_t`.
fn offset_at(offset: u64, done: usize) -> io::Result<libc::off_t> {
    offset
        .checked_add(done as u64)
        .and_then(|p| libc::off_t::try_from(p).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Moves past `n` transferred bytes from iovec `first` on; returns the new first iovec.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while n > 0 && first < iov.len() {
        let v = &mut iov[first];
        if n >= v.iov_len {
            n -= v.iov_len;
            first += 1;
        } else {
            // SAFETY: stays inside the same guest buffer (n < iov_len).
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    // Zero-length pieces left at the front carry nothing.
    while first < iov.len() && iov[first].iov_len == 0 {
        first += 1;
    }
    first
}
