//! Snapshots of a whole VM, and restoring a VM from one.
//!
//! # The snapshot directory (format version 2)
//!
//! | file | holds |
//! |---|---|
//! | `state` | the machine state: header, checksum, then the body below |
//! | `memory` | guest RAM: each RAM region's bytes, one region after the other, as a sparse file (pages that were never touched or are all zeros are holes) |
//! | `disk-<N>.raw`, `disk-<N>.qcow2` | a point-in-time copy of disk N (crash-consistent: every write the guest saw complete, none after) |
//!
//! `state` starts with a header, all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KILNSNAP` |
//! | 8 | 4 | format version (2) |
//! | 12 | 2 | length `n` of the Kiln version string (at most 64) |
//! | 14 | n | the Kiln version that wrote it (`CARGO_PKG_VERSION`) |
//! | 14+n | 8 | body length |
//! | 22+n | 4 | CRC-32 (IEEE) of the body |
//! | 26+n | … | body |
//!
//! The body, in order (integers little-endian; a byte string is a u32 length then the bytes;
//! a list is a u32 count then the items; an optional value a 0/1 byte then the value; a KVM
//! structure is a byte string of exactly its size):
//! the configuration (vCPU count u8, memory u64, kernel: 0 + path or 1 + image bytes,
//! optional initrd path, command line, disks: path, read-only, serial, backing directories,
//! block size; NICs: TAP name, 6-byte MAC; whether it has a PIT); the RAM regions (start, length); the disk copies
//! (file name, format name); the optional `kvm_pit_state2` (present exactly when the configuration has a PIT), `kvm_clock_data`, the PIC master, PIC slave and
//! IOAPIC `kvm_irqchip`s; per vCPU: CPUID entries, MSRs (every MSR of KVM's save list the vCPU
//! has), `kvm_regs`, `kvm_sregs`, `kvm_xsave`, optional `kvm_xcrs`, `kvm_debugregs`,
//! `kvm_lapic_state`, `kvm_mp_state`, `kvm_vcpu_events`, optional TSC kHz; the UART registers
//! and receive FIFO; the CMOS index and 128 bytes of NVRAM; the ACPI PM1 status, enable and
//! control registers; per virtio device (disks, then NICs): status, driver features, the
//! three select registers, config generation, interrupt status, broken flag, the transport's
//! queue registers, and the device's live queues (size, ready, ring addresses, next avail and
//! used indices, event index) if the driver had started it. The i8042 has no state (only its
//! reset line is emulated), and device configuration space is derived from the
//! configuration (capacity, block size, MAC).
//!
//! Loading checks, in order: the magic, the format version (only 2), the Kiln version (only
//! this build's: the layout of KVM structures and of the embedded probe guest may differ
//! between versions), the body length, the checksum, then the body: every length against
//! what is left and a limit, and that its parts agree (vCPU count, devices, regions). The
//! memory file must be exactly as long as the regions. A snapshot that fails any check is
//! refused with a [`SnapshotError`]; nothing is created.
//!
//! The checksum catches corruption, not tampering: a snapshot is as trusted as a disk image.
//! Like a backing file, a snapshot must not change while VMs restored from it run: their
//! memory is mapped from its memory file.
//! Guest memory has no checksum (reading it would cost the fast restore); its contents are
//! guest-controlled anyway, and Kiln treats everything in guest memory as hostile.
//!
//! # What a restored guest must be told
//!
//! - **Its clock moved.** As Firecracker does, the kvmclock is restored to the value it had
//!   when the snapshot was taken, and the TSC continues from its saved value: the guest sees
//!   no time pass while it was saved (no jump, no soft-lockup warnings), so its wall clock is
//!   behind by as long as the snapshot sat on disk. The guest must step its clock again
//!   (NTP, or an agent that sets it); Linux guests read the CMOS RTC (the host's time) only
//!   at boot.
//! - **Its network peers may have forgotten it.** TCP connections survive as long as the
//!   peer kept them (it saw a silent peer, and retransmits); ARP caches and NAT or firewall
//!   state of the host may have expired, and a clone restored with another MAC keeps using
//!   the MAC its driver read at boot until it re-reads it. A frame the device had read from
//!   the TAP but not yet delivered is lost, as networks lose frames.
//! - **Clones share their past.** Every clone of one snapshot has the same memory: the same
//!   random-number-generator state, the same secrets, the same machine id. A guest that
//!   clones must re-seed (for Linux: `vmgenid`, not yet offered by Kiln).

mod codec;
mod disk;
mod memory;
mod restore;
pub(crate) mod state;
mod take;

pub use restore::PreparedVm;
pub(crate) use restore::{restore_vm_state, Restore};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use disk::{DiskSnapshot, DiskSnapshotReport};
pub use take::SnapshotReport;

use crate::config::VmConfig;
use state::MachineState;

/// The magic at the start of a state file.
const MAGIC: &[u8; 8] = b"KILNSNAP";
/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The Kiln version written into snapshots and required of them.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file accepted (the probe guest's image is inside it): 64 MiB.
const MAX_STATE: u64 = 64 << 20;

/// Why a snapshot could not be taken, loaded or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot cannot be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The state file is not a Kiln snapshot.
    #[error("{0} is not a Kiln snapshot (bad magic)")]
    NotASnapshot(PathBuf),
    /// Another snapshot format version.
    #[error(
        "{path} has snapshot format version {found}; this Kiln reads version {FORMAT_VERSION} only"
    )]
    FormatVersion {
        /// The state file.
        path: PathBuf,
        /// The version it has.
        found: u32,
    },
    /// Written by another Kiln version.
    #[error("{path} was written by Kiln {found}; this is Kiln {KILN_VERSION}, which restores its own snapshots only")]
    KilnVersion {
        /// The state file.
        path: PathBuf,
        /// The version that wrote it.
        found: String,
    },
    /// The snapshot is damaged.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The VM is not running, or could not be paused.
    #[error("cannot snapshot the VM: {0}")]
    Vm(String),
    /// The destination exists already.
    #[error("{0} exists already; a snapshot is written into a new directory")]
    Exists(PathBuf),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// A snapshot loaded and checked, ready to restore one VM or many (clones share its memory
/// file copy-on-write).
pub struct Snapshot {
    dir: PathBuf,
    pub(crate) state: MachineState,
    pub(crate) memory: File,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("dir", &self.dir).finish()
    }
}

impl Snapshot {
    /// Loads the snapshot in `dir` and checks it (see the module documentation).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(STATE_FILE);
        let mut f = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        let corrupt = |reason: &str| SnapshotError::Corrupt {
            path: path.clone(),
            reason: reason.to_string(),
        };
        if len > MAX_STATE {
            return Err(corrupt("the state file is larger than any Kiln writes"));
        }
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        let body = check_header(&buf, &path)?;
        let state = MachineState::decode(body).map_err(|e| corrupt(&e.0))?;
        let mpath = dir.join(MEMORY_FILE);
        let memory = File::open(&mpath).map_err(io_err(format!("opening {}", mpath.display())))?;
        let mlen = memory
            .metadata()
            .map_err(io_err(format!("reading {}", mpath.display())))?
            .len();
        let want: u64 = state.regions.iter().map(|r| r.1).sum();
        if mlen != want {
            return Err(SnapshotError::Corrupt {
                path: mpath,
                reason: format!("{mlen} bytes where the state says {want}"),
            });
        }
        for d in &state.disks {
            let p = dir.join(&d.file);
            if !p.is_file() {
                return Err(corrupt(&format!(
                    "its disk copy {} is missing",
                    p.display()
                )));
            }
        }
        Ok(Self { dir, state, memory })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the VM had: host paths, TAPs and MACs a restore uses unless told
    /// otherwise.
    pub fn config(&self) -> &VmConfig {
        &self.state.config
    }

    /// The point-in-time copy of disk `index` inside the snapshot, and its format: the base
    /// for a clone's own disk (a qcow2 overlay on it), or to roll the disk back to.
    pub fn disk_copy(&self, index: usize) -> Option<(PathBuf, images::Format)> {
        self.state
            .disks
            .get(index)
            .map(|d| (self.dir.join(&d.file), d.format))
    }
}

/// The header of a state file, then its body.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(KILN_VERSION.len() as u16).to_le_bytes());
    out.extend_from_slice(KILN_VERSION.as_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks a state file's header and checksum; returns its body.
fn check_header<'a>(buf: &'a [u8], path: &Path) -> Result<&'a [u8], SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if buf.len() < 8 || &buf[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    let field = |at: usize, n: usize| {
        buf.get(at..at + n)
            .ok_or_else(|| corrupt("the header is truncated"))
    };
    let version = u32::from_le_bytes(field(8, 4)?.try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::FormatVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let n = u16::from_le_bytes(field(12, 2)?.try_into().unwrap_or_default()) as usize;
    if n > 64 {
        return Err(corrupt("the Kiln version is longer than 64 bytes"));
    }
    let kiln = String::from_utf8_lossy(field(14, n)?).into_owned();
    if kiln != KILN_VERSION {
        return Err(SnapshotError::KilnVersion {
            path: path.to_path_buf(),
            found: kiln,
        });
    }
    let body_len = u64::from_le_bytes(field(14 + n, 8)?.try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(field(22 + n, 4)?.try_into().unwrap_or_default());
    let body = &buf[26 + n..];
    if body.len() as u64 != body_len {
        return Err(corrupt(&format!(
            "the body is {} bytes; the header says {body_len} (truncated?)",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("the checksum does not match"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_in_order() {
        let p = Path::new("x/state");
        let good = frame(b"body");
        assert_eq!(check_header(&good, p).unwrap(), b"body");
        let mut other = good.clone();
        other[0] = b'X';
        assert!(matches!(
            check_header(&other, p),
            Err(SnapshotError::NotASnapshot(_))
        ));
        let mut next = good.clone();
        next[8] = (FORMAT_VERSION + 1) as u8;
        assert!(matches!(
            check_header(&next, p),
            Err(SnapshotError::FormatVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        let mut kiln = good.clone();
        kiln[14] = b'9';
        assert!(matches!(
            check_header(&kiln, p),
            Err(SnapshotError::KilnVersion { .. })
        ));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = check_header(&flipped, p).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        for n in 0..good.len() {
            assert!(check_header(&good[..n], p).is_err(), "{n} bytes accepted");
        }
    }
}
