//! One vCPU thread: `KVM_RUN` and dispatch of port and MMIO exits to the buses.

use std::sync::Arc;

use devices::{Bus, GuestRequest, GuestRequests};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vm::{BootControl, Outcome};

/// The buses every vCPU of a VM dispatches to.
pub(crate) struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Runs `vcpu` until the boot ends: the guest powers off or resets, the VM is stopped, or
/// something fails (reported to `control` with the vCPU state).
pub(crate) fn run(mut vcpu: VcpuFd, id: u8, buses: Arc<Buses>, control: Arc<BootControl>) {
    control.register_vcpu_thread();
    while !control.is_ending() {
        control.gate.park_while_paused(&control);
        if control.is_ending() {
            break;
        }
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                dispatch_io(&buses.pio, port, data.len(), |bus, p, range| {
                    bus.write(p, &data[range])
                });
                continue;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let len = data.len();
                dispatch_io(&buses.pio, port, len, |bus, p, range| {
                    bus.read(p, &mut data[range])
                });
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::Shutdown) => {
                control.request(GuestRequest::Reset, "triple fault");
                continue;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => {
                    control.request(GuestRequest::PowerOff, "system event");
                    continue;
                }
                KVM_SYSTEM_EVENT_RESET => {
                    control.request(GuestRequest::Reset, "system event");
                    continue;
                }
                KVM_SYSTEM_EVENT_CRASH => "the guest reported a crash".to_string(),
                other => format!("unknown system event {other}"),
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason says the `internal` member of the union is valid.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                format!(
                    "KVM internal error (suberror {}{}, data {:x?})",
                    internal.suberror,
                    match internal.suberror {
                        1 => ": emulation failure",
                        2 => ": simultaneous exception",
                        3 => ": delivery event",
                        _ => "",
                    },
                    &internal.data[..n]
                )
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            // EINTR: kicked by a signal; EAGAIN: an AP left wait-for-SIPI (PVM). Both retry.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let state = describe_state(&vcpu);
        tracing::error!(vcpu = id, "{failure}; {state}");
        control.finish(Outcome::Failed(format!("vCPU {id}: {failure}; {state}")));
        break;
    }
}

/// String I/O (`rep outsb`) arrives as one buffer of `count * size` bytes: larger than one
/// access, it is split into byte accesses, the common case for string port I/O.
fn dispatch_io(
    bus: &Bus,
    port: u16,
    len: usize,
    mut f: impl FnMut(&Bus, u64, std::ops::Range<usize>),
) {
    if len <= 4 {
        f(bus, port.into(), 0..len);
    } else {
        for i in 0..len {
            f(bus, port.into(), i..i + 1);
        }
    }
}

fn describe_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "vCPU state unavailable".into(),
    }
}
