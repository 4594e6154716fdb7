//! The VM-wide part of a restore: the VM shell (KVM VM and guest memory from the memory
//! file, registered), and KVM's PIT, irqchips and clock.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::state::KvmVmState;
use super::{memory, Snapshot};
use crate::host::Host;
use crate::machine::create_vm;
use crate::vm::VmError;

/// What a VM is restored from: a snapshot, or a shell prepared from one ahead of time.
pub(crate) enum Restore {
    Snapshot(Arc<Snapshot>),
    Prepared(PreparedVm),
}

/// A VM shell made ready ahead of a restore: the KVM VM with its irqchip, PIT (if it had one) and interrupt
/// routes, and guest memory mapped copy-on-write from the snapshot and registered with KVM.
/// Registering memory is the slow part of a restore (KVM waits for a memory-slot update that
/// takes milliseconds on some hosts); a host that keeps one of these per snapshot it serves
/// restores without that wait ([`crate::Vm::restore_prepared`]).
pub struct PreparedVm {
    pub(crate) vm: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) snapshot: Arc<Snapshot>,
}

impl PreparedVm {
    /// Builds the shell for restoring `snapshot`.
    pub fn new(host: &Host, snapshot: Arc<Snapshot>) -> Result<Self, VmError> {
        let mem = memory::map(&snapshot.memory, &snapshot.state.regions)?;
        let vm = create_vm(host, snapshot.state.config.pit, &mem)?;
        Ok(Self { vm, mem, snapshot })
    }

    /// The snapshot it restores.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }
}

/// Puts back the in-kernel PIT, PICs, IOAPIC and kvmclock. The clock gets the value it had
/// when the snapshot was taken (as Firecracker does by default): the guest sees no time pass
/// while it was saved, so nothing in it times out or jumps, and its wall clock lags by that
/// long until it is set again. Only the value is given: the flags KVM reported (such as
/// `KVM_CLOCK_TSC_STABLE`) describe the old host and are not for setting.
pub(crate) fn restore_vm_state(vm: &VmFd, s: &KvmVmState) -> Result<(), VmError> {
    let err = |what: &'static str| {
        move |e: kvm_ioctls::Error| VmError::Build(format!("{what} from the snapshot: {e}"))
    };
    if let Some(pit) = &s.pit {
        vm.set_pit2(pit).map_err(err("PIT"))?;
    }
    vm.set_irqchip(&s.pic_master).map_err(err("PIC master"))?;
    vm.set_irqchip(&s.pic_slave).map_err(err("PIC slave"))?;
    vm.set_irqchip(&s.ioapic).map_err(err("IOAPIC"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(err("kvmclock"))?;
    Ok(())
}
