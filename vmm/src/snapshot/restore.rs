//! The VM-wide part of a restore: guest memory from the memory file, and KVM's PIT,
//! irqchips and clock.

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::state::KvmVmState;
use super::{memory, Snapshot};
use crate::vm::VmError;

/// Guest memory for a VM restored from `snapshot`, copy-on-write over its memory file.
pub(crate) fn map_memory(snapshot: &Snapshot) -> Result<GuestMemoryMmap, VmError> {
    Ok(memory::map(&snapshot.memory, &snapshot.state.regions)?)
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
    vm.set_pit2(&s.pit).map_err(err("PIT"))?;
    vm.set_irqchip(&s.pic_master).map_err(err("PIC master"))?;
    vm.set_irqchip(&s.pic_slave).map_err(err("PIC slave"))?;
    vm.set_irqchip(&s.ioapic).map_err(err("IOAPIC"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(err("kvmclock"))?;
    Ok(())
}
