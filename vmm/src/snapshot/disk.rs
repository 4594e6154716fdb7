//! Snapshots of one disk of a running VM.
//!
//! Crash-consistent without pausing the guest: the block device is locked, which is what
//! its event loop holds while it carries out a request, so no request is half done; every
//! request completed so far (returned in the used ring, so the guest may have seen it) has
//! been written to the image, and a flush makes the image file whole; the snapshot is taken
//! and the lock released. Requests the guest queues meanwhile wait in the ring and land
//! after the snapshot. The vCPUs run on throughout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::bus::lock;

use super::SnapshotError;
use crate::config::DiskConfig;
use crate::vm::VmHandle;

/// Where the snapshot of a running disk goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSnapshot {
    /// An internal snapshot of a qcow2 disk, by name (`qemu-img snapshot -l` lists it).
    Internal(String),
    /// A new file holding the disk as it is: a raw disk's is a reflink where the file
    /// system has them, else a copy of its data; a qcow2 disk's a flattened qcow2 copy.
    File(PathBuf),
}

/// What a running disk's snapshot cost.
#[derive(Clone, Debug, Default)]
pub struct DiskSnapshotReport {
    /// How long the device was held (requests wait in the ring meanwhile).
    pub held_for: Duration,
    /// For a raw disk copied to a file: how.
    pub raw_copy: Option<images::RawCopy>,
}

/// Copies disk `d` (flushed, with no writer active) to `dst`, a new file in its own format.
pub(crate) fn copy_disk(
    d: &DiskConfig,
    dst: &Path,
) -> Result<(images::Format, Option<images::RawCopy>), SnapshotError> {
    let fail =
        |e: images::Error| SnapshotError::Vm(format!("copying disk {}: {e}", d.path.display()));
    let format = images::detect_format(&d.path).map_err(fail)?;
    let raw = match format {
        images::Format::Raw => Some(images::snapshot_raw(&d.path, dst).map_err(fail)?),
        images::Format::Qcow2 => {
            images::clone_image(&d.path, dst, format, &d.open_options(), &mut |_| {})
                .map_err(fail)?;
            None
        }
    };
    Ok((format, raw))
}

impl VmHandle {
    /// Takes a crash-consistent snapshot of disk `index` (in configuration order) while the
    /// guest runs.
    pub fn snapshot_disk(
        &self,
        index: usize,
        to: &DiskSnapshot,
    ) -> Result<DiskSnapshotReport, SnapshotError> {
        let d = self
            .config()
            .disks
            .get(index)
            .ok_or_else(|| SnapshotError::Vm(format!("the VM has no disk {index}")))?;
        let parts = self.parts().map_err(|e| SnapshotError::Vm(e.to_string()))?;
        let dev = parts
            .devices
            .get(index)
            .ok_or_else(|| SnapshotError::Vm(format!("the VM has no disk {index}")))?;
        let start = Instant::now();
        let mut guard = lock(dev);
        let disk = guard
            .disk()
            .ok_or_else(|| SnapshotError::Vm(format!("device {index} is not a disk")))?;
        let fail = |e: images::Error| {
            SnapshotError::Vm(format!("snapshot of disk {}: {e}", d.path.display()))
        };
        disk.flush().map_err(fail)?;
        let mut report = DiskSnapshotReport::default();
        match to {
            DiskSnapshot::Internal(name) => disk.create_snapshot(name).map_err(fail)?,
            DiskSnapshot::File(dst) => report.raw_copy = copy_disk(d, dst)?.1,
        }
        drop(guard);
        report.held_for = start.elapsed();
        Ok(report)
    }
}
