//! TAP devices: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload flags for [`Tap::set_offload`].
pub mod offload {
    /// The guest accepts frames with partial checksums.
    pub const CSUM: u32 = 0x01;
    /// The guest accepts TCPv4 segmentation offload frames.
    pub const TSO4: u32 = 0x02;
    /// The guest accepts TCPv6 segmentation offload frames.
    pub const TSO6: u32 = 0x04;
    /// ... with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Length of the virtio-net header on the TAP (virtio 1.x, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Checks a TAP device name: 1-15 bytes (the kernel's `IFNAMSIZ` less the NUL) of ASCII
/// letters, digits, `-`, `_` and `.`, neither `.` nor `..` (names the kernel refuses or reads
/// as a path), and no `%` (which the kernel takes as a template, `tap%d`, and would fill in).
pub fn check_name(name: &str) -> Result<(), String> {
    let chars_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if name.is_empty() || name.len() > 15 || !chars_ok || name == "." || name == ".." {
        return Err(format!(
            "invalid TAP name {name:?}: 1-15 of letters, digits, '-', '_' and '.', not '.' or '..'"
        ));
    }
    Ok(())
}

/// [`check_name`], and the name is not the host's interface of another kind (`lo`, `eth0`, a
/// bridge): a TAP is opened or created under it, never another device taken over.
pub fn check_host_tap(name: &str) -> Result<(), String> {
    check_name(name)?;
    let dev = std::path::Path::new("/sys/class/net").join(name);
    if dev.exists() && !dev.join("tun_flags").exists() {
        return Err(format!(
            "{name:?} is a network interface of the host that is not a TAP device"
        ));
    }
    Ok(())
}

/// An open TAP device, non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens the TAP named `name`, creating it if missing, with a 12-byte vnet header.
    pub fn open(name: &str) -> io::Result<Tap> {
        check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.bring_up()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the guest accepts (`offload::*`).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets IFF_UP (a TAP Kiln created starts down).
    fn bring_up(&self) -> io::Result<()> {
        // A datagram socket used only for interface ioctls; closed when dropped.
        let sock = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::DGRAM,
            None,
        )?;
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS on an ifreq we own.
        let r = unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                -1
            } else if req.flags & libc::IFF_UP as libc::c_short != 0 {
                0
            } else {
                req.flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req)
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (with its vnet header); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (with its vnet header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_misread_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "tap%d",
            "a/b",
            "a b",
            "a\0b",
            "sixteen-chars-xx",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["tap0", "kiln-web.1", "vm_tap"] {
            check_name(good).unwrap();
        }
        assert!(check_host_tap("lo").unwrap_err().contains("not a TAP"));
    }
}
