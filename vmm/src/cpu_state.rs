//! The state of one vCPU as KVM holds it, read for a snapshot and written back on restore.
//!
//! The orders follow KVM's rules (as Firecracker documents them): `KVM_GET_MP_STATE` first,
//! since it may change LAPIC state, and `KVM_GET_VCPU_EVENTS` last; on restore CPUID first,
//! `KVM_SET_REGS` before the events (it clears pending exceptions), the LAPIC after the
//! special registers (which carry the APIC base) and before the MSRs (the TSC-deadline MSR
//! needs the LAPIC configured), the events last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;

/// Everything KVM keeps about one vCPU.
pub(crate) struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency; restored when the host's differs (TSC scaling).
    pub tsc_khz: Option<u32>,
}

/// Most MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` call.
const MSR_CHUNK: usize = 64;

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Completes what the last exit left half done (the result of an `in` or an MMIO read is
/// written into the guest's registers only when `KVM_RUN` is entered again): KVM_RUN with
/// immediate exit does that and returns at once, without running guest code.
pub(crate) fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// Reads every MSR of `indices` that this vCPU has: KVM stops a batch at the first one it
/// cannot read, which is then skipped.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let n = rest.len().min(MSR_CHUNK);
        let entries: Vec<_> = rest[..n]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSRs: {e:?}"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the MSR that stopped the batch, if one did (absent for this guest's CPUID).
        rest = &rest[(read + 1).min(n)..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is parked), after
    /// [`complete_pending_io`].
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], xcrs: bool) -> Result<Self, String> {
        let mp_state = vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
        let xcrs = if xcrs {
            Some(vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(vcpu, msr_indices)?;
        let events = vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
            tsc_khz,
        })
    }

    /// Writes the state into a fresh vCPU, before its thread first enters `KVM_RUN`.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), String> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| format!("CPUID: {e:?}"))?;
        vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // Only when the host's differs: setting it needs TSC scaling, which not every
            // host has.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(|e| {
                    format!(
                        "the guest's TSC runs at {khz} kHz and this host cannot scale to it: {e}"
                    )
                })?;
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: a kvm_xsave of the size KVM_GET_XSAVE fills; KVM checks its contents.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| format!("MSRs: {e:?}"))?;
            let set = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(format!("KVM refused MSR {:#x}", chunk[set].index));
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        tell_paused(vcpu);
        Ok(())
    }
}

/// Tells a guest that uses kvmclock that its vCPU was stopped (`KVM_KVMCLOCK_CTRL`), as
/// Firecracker does on every pause and restore: its soft-lockup watchdog then ignores the
/// time the vCPU did not run. Fails, harmlessly, for a guest without kvmclock.
pub(crate) fn tell_paused(vcpu: &VcpuFd) {
    if let Err(e) = vcpu.kvmclock_ctrl() {
        tracing::trace!("KVM_KVMCLOCK_CTRL: {e}");
    }
}
