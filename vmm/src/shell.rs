//! VM shells built ahead of a boot: a KVM VM (irqchip and interrupt routes, no PIT) with
//! fresh guest memory mapped and registered, so that a host that keeps a few shells ready
//! ([`crate::Vm::use_shell`]) boots without those steps (well under a millisecond since memory
//! is registered before the irqchip; see `machine::create_vm`).
//!
//! A shell's memory has never held a guest (no data of one guest can reach another), and a
//! shell is used for one boot only.

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::host::Host;
use crate::machine::{create_vm, guest_memory};
use crate::vm::VmError;

/// A KVM VM with `memory` bytes of registered guest RAM, not yet booted.
pub struct VmShell {
    pub(crate) vm: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    memory: u64,
}

impl VmShell {
    /// Builds a shell for guests of `memory` bytes (blocks while KVM registers it).
    pub fn new(host: &Host, memory: u64) -> Result<Self, VmError> {
        let mem = guest_memory(memory)?;
        let vm = create_vm(host, false, &mem)?;
        Ok(Self { vm, mem, memory })
    }

    /// The guest RAM it has, in bytes.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// Whether a VM of `config` can boot in it: the same memory size, and no PIT.
    pub fn fits(&self, config: &VmConfig) -> bool {
        config.memory == self.memory && !config.pit
    }
}
