//! The one conversion from an instance's definition to a [`VmConfig`], and the errors of the
//! VM's checks ([`VmConfig::check_limits`], [`VmConfig::validate`]) as refusals that name the
//! definition's field. The rules themselves live in `vmm::config`, once.

use vmm::{ConfigError, DiskConfig, KernelImage, NetConfig, VmConfig};

use crate::error::{invalid, Error, Result};
use crate::model::{DiskDef, Image, InstanceDef};
use crate::Manager;

/// What an instance's definition refers to, resolved: its images and its disks (in the order
/// of its attachments).
pub(crate) struct Parts<'a> {
    /// The kernel image.
    pub kernel: &'a Image,
    /// The initrd image.
    pub initrd: Option<&'a Image>,
    /// The attached disks.
    pub disks: Vec<&'a DiskDef>,
}

impl Manager {
    /// The VM an instance's definition describes.
    pub(crate) fn vm_config(&self, def: &InstanceDef, parts: &Parts) -> Result<VmConfig> {
        let kernel = match &parts.kernel.path {
            None => KernelImage::Bytes(self.probe.clone()),
            Some(p) => KernelImage::File(p.clone()),
        };
        let initrd = parts
            .initrd
            .map(|i| {
                i.path
                    .clone()
                    .ok_or_else(|| invalid("boot.initrd", format!("image {} has no file", i.name)))
            })
            .transpose()?;
        let backing_dirs = self.open_options().allowed_dirs;
        let disks = def
            .disks
            .iter()
            .zip(&parts.disks)
            .map(|(a, d)| DiskConfig {
                path: self.store.disk_file(d),
                read_only: a.read_only,
                serial: d
                    .name
                    .chars()
                    .take(devices::virtio::block::ID_LEN)
                    .collect(),
                backing_dirs: backing_dirs.clone(),
                block_size: d.block_size,
            })
            .collect();
        let nets = def
            .network_interfaces
            .iter()
            .map(|n| NetConfig {
                tap: n.host_tap.clone(),
                mac: n.mac,
            })
            .collect();
        Ok(VmConfig {
            vcpus: def.vcpus,
            memory: def.memory,
            kernel,
            initrd,
            cmdline: def.boot.cmdline.clone(),
            disks,
            nets,
            // Instances boot Linux with kvm-clock, which needs no PIT (README, "The PIT").
            pit: false,
        })
    }
}

/// A VM check's refusal, naming the field of the definition that causes it.
pub(crate) fn config_error(e: ConfigError) -> Error {
    use ConfigError as C;
    let message = e.to_string();
    let field = match &e {
        C::TooManyVcpus(..) | C::TooMuchMemory(..) => {
            return Error::InsufficientCapacity(message);
        }
        C::NoVcpus => "vcpus".to_string(),
        C::TooLittleMemory(_) => "memory".to_string(),
        C::KernelFile(..) | C::NotAKernel(_) => "boot.kernel".to_string(),
        C::InitrdFile(..) => "boot.initrd".to_string(),
        C::CmdlineTooLong(_) | C::CmdlineChars(_) => "boot.cmdline".to_string(),
        C::TooManyDevices(_) => "disks".to_string(),
        C::Disk { index, .. } => format!("disks[{index}]"),
        C::Net { index, .. } => format!("network_interfaces[{index}].host_tap"),
    };
    invalid(&field, message)
}
