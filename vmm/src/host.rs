//! What the host's KVM offers, probed once per process.

use std::path::Path;

use boot::cpu::HostQuirks;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    Open(kvm_ioctls::Error),
    /// KVM lacks a capability Kiln needs.
    #[error("the host KVM lacks {0:?}, which Kiln needs")]
    MissingCap(Cap),
    /// A query to KVM failed.
    #[error("KVM query failed: {0}")]
    Query(kvm_ioctls::Error),
}

/// The host's KVM and its limits.
pub struct Host {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// Largest vCPU count per VM Kiln accepts (KVM's limit, and 254 for xAPIC ids).
    pub max_vcpus: u8,
    /// Host RAM in bytes.
    pub memory: u64,
    /// Host peculiarities that change what guests are shown.
    pub quirks: HostQuirks,
    /// CPUID KVM can virtualise.
    pub cpuid: CpuId,
    /// MSRs KVM can save and restore.
    pub msrs: Vec<u32>,
}

impl Host {
    /// Opens `/dev/kvm` and reads its limits.
    pub fn open() -> Result<Self, HostError> {
        let kvm = Kvm::new().map_err(HostError::Open)?;
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(HostError::MissingCap(cap));
            }
        }
        let max_vcpus = kvm.get_max_vcpus().min(254) as u8;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HostError::Query)?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(HostError::Query)?
            .as_slice()
            .to_vec();
        let quirks = HostQuirks {
            pvm: is_pvm(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        tracing::debug!(
            max_vcpus,
            pvm = quirks.pvm,
            tsc_deadline = quirks.tsc_deadline,
            "opened /dev/kvm"
        );
        Ok(Self {
            kvm,
            max_vcpus,
            memory: host_memory(),
            quirks,
            cpuid,
            msrs,
        })
    }
}

/// True when `/dev/kvm` is PVM (see GUESTS.md): no VMX/SVM, guests emulated.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// True when the host CPU has hardware virtualisation (VMX or SVM) and KVM is not PVM.
pub fn has_hardware_virtualization() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && !is_pvm()
}

fn host_memory() -> u64 {
    let info = rustix::system::sysinfo();
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}
