//! One vCPU thread: `KVM_RUN` and dispatch of port and MMIO exits to the buses; the
//! process-wide count of vCPU exits by reason ([`exit_counts`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{Bus, GuestRequest, GuestRequests};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpu_state::{self, VcpuState};
use crate::vm::{BootControl, Outcome};

/// Why `KVM_RUN` returned to Kiln, as counted by [`exit_counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Port I/O (`in`/`out`, string I/O included).
    Io,
    /// An access to guest-physical memory with no RAM behind it.
    Mmio,
    /// `hlt` (only without an in-kernel LAPIC; KVM usually handles it itself).
    Hlt,
    /// `KVM_RUN` interrupted: a signal kicked the vCPU out (pause, stop), or on PVM an AP
    /// left wait-for-SIPI.
    Intr,
    /// A triple fault.
    Shutdown,
    /// A system event (power-off, reset, crash).
    SystemEvent,
    /// `KVM_EXIT_INTERNAL_ERROR` (an emulation failure, for instance).
    InternalError,
    /// KVM could not enter the guest.
    FailEntry,
    /// Any other exit.
    Other,
    /// `KVM_RUN` failed with an error.
    Error,
}

impl ExitReason {
    /// Every reason, in the order of [`exit_counts`].
    pub const ALL: [ExitReason; 10] = [
        ExitReason::Io,
        ExitReason::Mmio,
        ExitReason::Hlt,
        ExitReason::Intr,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::InternalError,
        ExitReason::FailEntry,
        ExitReason::Other,
        ExitReason::Error,
    ];

    /// A short lower-case name (a metric label): `io`, `internal_error`, …
    pub fn label(self) -> &'static str {
        match self {
            ExitReason::Io => "io",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Intr => "intr",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::InternalError => "internal_error",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::Other => "other",
            ExitReason::Error => "error",
        }
    }
}

/// One counter per cache line, so that vCPUs counting different reasons do not share one.
#[repr(align(64))]
struct ExitCounter(AtomicU64);

/// vCPU exits of every VM of the process, indexed by `ExitReason as usize`.
static EXITS: [ExitCounter; ExitReason::ALL.len()] =
    [const { ExitCounter(AtomicU64::new(0)) }; ExitReason::ALL.len()];

/// Counts one exit: a relaxed atomic increment, no lock.
#[inline]
fn count(reason: ExitReason) {
    EXITS[reason as usize].0.fetch_add(1, Ordering::Relaxed);
}

/// vCPU exits of every VM this process has run, by reason (every reason, zeros included), in
/// the order of [`ExitReason::ALL`].
pub fn exit_counts() -> [(ExitReason, u64); ExitReason::ALL.len()] {
    ExitReason::ALL.map(|r| (r, EXITS[r as usize].0.load(Ordering::Relaxed)))
}

/// The buses every vCPU of a VM dispatches to.
pub(crate) struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` of the vCPU this thread runs (null on other
    /// threads), for the kick signal's handler. Constant-initialised and without a destructor:
    /// a plain TLS access, safe in a signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Called by the kick signal's handler (SIGRTMIN), on the thread the signal was sent to: sets
/// the `immediate_exit` of its vCPU, so that a kick that lands just before `KVM_RUN` makes it
/// return at once (`EINTR`) instead of being lost. Does nothing on other threads.
pub(crate) fn kicked() {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points into the `kvm_run` mapping of the vCPU this thread runs, set by
        // `run` below and cleared before that vCPU is dropped; the handler runs on this thread,
        // so the mapping is alive. KVM reads the byte at the next KVM_RUN.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Clears this thread's [`IMMEDIATE_EXIT`] when the vCPU's loop ends, however it ends.
struct KickTarget;

impl KickTarget {
    fn set(vcpu: &mut VcpuFd) -> Self {
        let byte = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|c| c.set(byte));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// What a vCPU saves of itself for a snapshot besides its registers.
pub(crate) struct SaveList {
    /// The MSRs (KVM's list of MSRs to save).
    pub msrs: Vec<u32>,
    /// Whether KVM has `KVM_GET_XCRS`.
    pub xcrs: bool,
}

/// Runs `vcpu` until the boot ends: the guest powers off or resets, the VM is stopped, or
/// something fails (reported to `control` with the vCPU state). While the VM is paused it
/// saves its state when a snapshot asks.
pub(crate) fn run(
    mut vcpu: VcpuFd,
    id: u8,
    buses: Arc<Buses>,
    control: Arc<BootControl>,
    save: &SaveList,
) {
    let _kick = KickTarget::set(&mut vcpu);
    while !control.is_ending() {
        if control.gate.is_paused() {
            cpu_state::tell_paused(&vcpu);
        }
        control
            .gate
            .park_while_paused(&control, id.into(), &mut || {
                cpu_state::complete_pending_io(&mut vcpu);
                VcpuState::save(&vcpu, &save.msrs, save.xcrs)
            });
        if control.is_ending() {
            break;
        }
        let exit = vcpu.run();
        count(match &exit {
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => ExitReason::Io,
            Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => ExitReason::Mmio,
            Ok(VcpuExit::Hlt) => ExitReason::Hlt,
            Ok(VcpuExit::Intr) => ExitReason::Intr,
            Ok(VcpuExit::Shutdown) => ExitReason::Shutdown,
            Ok(VcpuExit::SystemEvent(..)) => ExitReason::SystemEvent,
            Ok(VcpuExit::InternalError) => ExitReason::InternalError,
            Ok(VcpuExit::FailEntry(..)) => ExitReason::FailEntry,
            Ok(_) => ExitReason::Other,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitReason::Intr,
            Err(_) => ExitReason::Error,
        });
        let failure = match exit {
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
        let failure = match crate::sandbox::take_refused() {
            Some(nr) => format!("{}; {failure}", crate::sandbox::refusal(nr)),
            None => failure,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_reason() {
        let before = exit_counts();
        count(ExitReason::Io);
        count(ExitReason::InternalError);
        count(ExitReason::InternalError);
        let after = exit_counts();
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!((before[i].0, after[i].0), (*r, *r), "in the order of ALL");
            assert_eq!(*r as usize, i, "ALL is indexed by the discriminant");
        }
        // Other tests may boot VMs at the same time: the counters only grow.
        assert!(after[ExitReason::Io as usize].1 > before[ExitReason::Io as usize].1);
        let ie = ExitReason::InternalError as usize;
        assert!(after[ie].1 >= before[ie].1 + 2);
        let mut labels: Vec<_> = ExitReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), ExitReason::ALL.len());
    }
}
