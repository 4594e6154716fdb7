//! A request's guest buffers as host iovecs, so that disk data moves between an image file and
//! guest memory in one `preadv`/`pwritev`, with no copy through a buffer of ours.
//!
//! The iovecs hold raw pointers into guest memory and no Rust reference is ever made to those
//! bytes: the guest may change them at any time (that can only garble its own request).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, Permissions};

/// At most this many pieces per request (Linux's `IOV_MAX`); a longer request takes the
/// copying path.
const IOV_MAX: usize = 1024;

/// Host iovecs over one request's guest buffers, kept by the device and refilled for each
/// request (no allocation per request once it has grown).
#[derive(Default)]
pub(crate) struct GuestIovecs(Vec<libc::iovec>);

// SAFETY: the pointers are only followed by the thread that filled them, during the request
// they were filled for (`map` clears what an earlier request left).
unsafe impl Send for GuestIovecs {}

/// Which way the data goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the file into the guest's device-writable buffers.
    ToGuest,
    /// From the guest's device-readable buffers to the file.
    FromGuest,
}

impl GuestIovecs {
    /// Maps bytes `data` of the buffers of `chain` that go `dir` (counted across those buffers
    /// in order). False (and nothing to use) when a buffer lies outside guest memory, the buffers
    /// hold fewer bytes, or they come in more than [`IOV_MAX`] pieces.
    pub(crate) fn map(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        dir: Direction,
        data: std::ops::Range<usize>,
    ) -> bool {
        self.0.clear();
        let (writable, access) = match dir {
            Direction::ToGuest => (true, Permissions::Write),
            Direction::FromGuest => (false, Permissions::Read),
        };
        let (skip, end) = (data.start, data.end);
        let mut pos = 0usize;
        for d in chain.filter(|d| d.is_write_only() == writable) {
            // This buffer holds bytes [pos, pos + its length) of the direction; keep what lies
            // in [skip, end).
            let buf_start = pos;
            pos = pos.saturating_add(d.len() as usize);
            let (start, stop) = (buf_start.max(skip), pos.min(end));
            if start >= stop {
                if pos >= end {
                    break;
                }
                continue;
            }
            let Some(addr) = d.addr().checked_add((start - buf_start) as u64) else {
                return false;
            };
            let Ok(slices) = mem.get_slices(addr, stop - start, access) else {
                return false;
            };
            for slice in slices {
                let Ok(slice) = slice else { return false };
                if self.0.len() == IOV_MAX {
                    return false;
                }
                self.0.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        pos >= end
    }

    /// Carries out what [`GuestIovecs::map`] mapped, at `offset` in `file`. Reading, bytes past
    /// the file's end (a file shrunk behind our back) read as zeros.
    pub(crate) fn transfer(&mut self, file: &File, offset: u64, dir: Direction) -> io::Result<()> {
        let fd = file.as_raw_fd();
        let mut done = 0usize;
        let mut first = 0usize;
        while first < self.0.len() {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let rest = &self.0[first..];
            let count = rest.len() as libc::c_int;
            // SAFETY: every iovec points into guest memory that stays mapped while the caller
            // holds `mem`; preadv writes, and pwritev reads, at most iov_len bytes of each.
            let n = unsafe {
                match dir {
                    Direction::ToGuest => libc::preadv(fd, rest.as_ptr(), count, pos),
                    Direction::FromGuest => libc::pwritev(fd, rest.as_ptr(), count, pos),
                }
            };
            match n {
                0 if dir == Direction::ToGuest => {
                    // The file ends here: the rest reads as zeros.
                    for v in rest {
                        // SAFETY: as above; guest memory of iov_len bytes.
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                    return Ok(());
                }
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => {
                    done += n as usize;
                    first = advance(&mut self.0, first, n as usize);
                }
            }
        }
        Ok(())
    }
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
    first
}
