//! Taking a snapshot of a running VM.
//!
//! The VM is paused (every vCPU parked between two `KVM_RUN`s, its last exit completed) and
//! every virtio device is locked: the event loop cannot be in the middle of a request, so
//! every request the guest saw complete is in the disks and in memory, and none is half
//! done. Then the vCPUs save their own state, KVM's VM state and the devices' are read, each
//! disk is flushed and copied, memory is written, and the state file last. The VM resumes
//! (unless it was paused before) once all of it is on disk.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::virtio::VirtioDevice;
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use super::disk::copy_disk;
use super::memory;
use super::state::{DiskCopy, KvmVmState, MachineState, VirtioState};
use super::{frame, io_err, SnapshotError, MEMORY_FILE, STATE_FILE};
use crate::machine::Parts;
use crate::vm::VmHandle;

/// How long the vCPUs get to stop and to save their state.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a snapshot cost.
#[derive(Clone, Debug, Default)]
pub struct SnapshotReport {
    /// From the pause to the VM running again (zero work left for the guest's vCPUs).
    pub paused_for: Duration,
    /// Bytes of guest memory written (pages that held data).
    pub memory_written: u64,
    /// Bytes of guest memory in all.
    pub memory_total: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Time spent copying disks (inside the pause).
    pub disk_copy: Duration,
    /// Bytes the disk copies occupy on the host (allocated blocks: near zero for reflinks).
    pub disk_bytes: u64,
}

/// Removes a half-written snapshot directory unless disarmed.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Vm(format!("{what}: {e}"))
}

fn vm_state(parts: &Parts, pit: bool) -> Result<KvmVmState, SnapshotError> {
    let chip = |id| -> Result<kvm_irqchip, SnapshotError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        parts
            .vm
            .get_irqchip(&mut c)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(KvmVmState {
        pit: pit
            .then(|| parts.vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2")))
            .transpose()?,
        clock: parts.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
    })
}

fn format_of(path: &Path) -> Result<images::Format, SnapshotError> {
    images::detect_format(path)
        .map_err(|e| SnapshotError::Vm(format!("disk {}: {e}", path.display())))
}

/// Space a file takes on the host.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

impl VmHandle {
    /// Takes a snapshot of the running VM into `dir`, a new directory (see
    /// [`crate::snapshot`] for what it holds). The guest is paused meanwhile and resumes
    /// afterwards, unless it was paused already. On failure nothing is left at `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
        let parts = self.parts().map_err(|e| SnapshotError::Vm(e.to_string()))?;
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SnapshotError::Exists(dir.to_path_buf()))
            }
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
        let mut partial = Partial(Some(dir.to_path_buf()));
        let was_paused = self.is_paused();
        let start = Instant::now();
        let r = self
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| SnapshotError::Vm(e.to_string()))
            .and_then(|()| self.write_snapshot(&parts, dir));
        if !was_paused {
            self.resume();
        }
        let mut report = r?;
        report.paused_for = start.elapsed();
        partial.0 = None;
        Ok(report)
    }

    fn write_snapshot(&self, parts: &Parts, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
        let config = self.config().clone();
        // Quiesce the devices: the event loop waits on these locks until the end.
        let mut guards: Vec<MutexGuard<'_, dyn VirtioDevice>> =
            parts.devices.iter().map(|d| lock(d)).collect();
        let vcpus = self.vcpu_states(PAUSE_TIMEOUT).map_err(SnapshotError::Vm)?;
        let vm = vm_state(parts, config.pit)?;
        let virtio = parts
            .transports
            .iter()
            .zip(&guards)
            .map(|(t, d)| VirtioState {
                transport: lock(t).state(),
                active: d.queue_states(),
            })
            .collect();
        let mut report = SnapshotReport::default();
        let t = Instant::now();
        let mut disks = Vec::new();
        for (i, (d, guard)) in config.disks.iter().zip(guards.iter_mut()).enumerate() {
            if let Some(disk) = guard.disk() {
                disk.flush().map_err(|e| {
                    SnapshotError::Vm(format!("flushing disk {}: {e}", d.path.display()))
                })?;
            }
            let file = format!("disk-{i}.{}", format_of(&d.path)?.name());
            let dst = dir.join(&file);
            let (format, _) = copy_disk(d, &dst)?;
            report.disk_bytes += allocated(&dst);
            disks.push(DiskCopy { file, format });
        }
        report.disk_copy = t.elapsed();

        let mpath = dir.join(MEMORY_FILE);
        let mfile = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&mpath)
            .map_err(io_err(format!("creating {}", mpath.display())))?;
        let written = memory::save(&parts.mem, &mfile)?;
        report.memory_written = written.written;
        report.memory_total = written.total;

        let state = MachineState {
            regions: parts.mem_regions().into_iter().collect(),
            config,
            disks,
            vm,
            vcpus,
            serial: lock(&parts.serial).state(),
            cmos_index: lock(&parts.cmos).index(),
            nvram: *lock(&self.nvram()),
            acpi_pm: lock(&parts.pm).state(),
            virtio,
        };
        drop(guards);
        let bytes = frame(&state.encode());
        report.state_bytes = bytes.len() as u64;
        write_durably(&dir.join(STATE_FILE), &bytes)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing {}", dir.display())))?;
        Ok(report)
    }
}

/// Writes `path` through a temporary file and a rename, synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))
}
