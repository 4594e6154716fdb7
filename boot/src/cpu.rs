//! The initial state of each vCPU: CPUID, MSRs, registers, segments, FPU and LAPIC, plus the
//! GDT and identity page tables the 64-bit entry needs in guest memory.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    CpuId,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::kernel::BootEntry;
use crate::layout::{
    GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use crate::{Error, Result};

/// Top of the stack the 64-bit entry starts with (grows down towards the GDT).
pub const BOOT_STACK: u64 = 0x6000;

/// Facts about the host's KVM that decide what the guest may be shown.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostQuirks {
    /// The host KVM is PVM: it emulates non-PVM guests instruction by instruction and its
    /// emulator lacks `cmpxchg16b` and the XSAVE family, so those features are hidden.
    pub pvm: bool,
    /// KVM emulates the LAPIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`). KVM does
    /// not list it in its supported CPUID: the VMM announces it.
    pub tsc_deadline: bool,
}

// CPUID feature bits.
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EBX: AVX2 and the AVX-512 family, all state that needs XSAVE.
const LEAF7_EBX_XSAVE_STATE: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7 ECX: AVX-512 VBMI, VBMI2, GFNI/VAES/VPCLMULQDQ on YMM, VNNI, BITALG, VPOPCNTDQ, PKU.
const LEAF7_ECX_XSAVE_STATE: u32 =
    (1 << 1) | (1 << 3) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7 EDX: AVX-512 4VNNIW/4FMAPS, VP2INTERSECT, AMX, AVX512-FP16.
const LEAF7_EDX_XSAVE_STATE: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);

/// Adapts KVM's supported CPUID list for vCPU `id` of `count`: APIC ids and topology (one
/// socket, `count` cores, one thread each), the hypervisor bit, no PMU, and features the host
/// cannot run hidden.
pub fn filter_cpuid(supported: &CpuId, id: u8, count: u8, quirks: HostQuirks) -> Result<CpuId> {
    let core_bits = (count as u32).next_power_of_two().trailing_zeros();
    let is_amd = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == 0x6874_7541); // "Auth"
    let mut out: Vec<kvm_cpuid_entry2> = Vec::new();
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // With it, Linux drives its LAPIC timer by TSC deadline and neither calibrates
                // it against the PIT nor disables it when that calibration looks off.
                if quirks.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
                if quirks.pvm {
                    e.ecx &= !(LEAF1_ECX_CX16
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C);
                }
            }
            4 => {
                // Cores per package; caches above L2 are shared by all of them.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((u32::from(count) - 1) << 26);
            }
            7 if e.index == 0 && quirks.pvm => {
                e.ebx &= !LEAF7_EBX_XSAVE_STATE;
                e.ecx &= !LEAF7_ECX_XSAVE_STATE;
                e.edx &= !(LEAF7_EDX_XSAVE_STATE | (1 << 29)); // and ARCH_CAPABILITIES
            }
            0xa => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT (1 thread), level 1 core (`count` cores).
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0xd if quirks.pvm => continue,
            0x8000_0008 if is_amd => {
                e.ecx = (e.ecx & !0xf0ff) | (u32::from(count) - 1) | (core_bits << 12);
            }
            _ => {}
        }
        out.push(e);
    }
    CpuId::from_entries(&out).map_err(|_| Error::Cpuid)
}

/// MSRs every vCPU starts with. The caller drops the ones the host KVM does not list.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(IA32_SYSENTER_CS, 0),
        msr(IA32_SYSENTER_ESP, 0),
        msr(IA32_SYSENTER_EIP, 0),
        msr(STAR, 0),
        msr(LSTAR, 0),
        msr(CSTAR, 0),
        msr(SYSCALL_MASK, 0),
        msr(KERNEL_GS_BASE, 0),
        msr(IA32_TSC, 0),
        msr(IA32_MISC_ENABLE, 1),          // fast strings
        msr(MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS, 32-bit code.
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x08: code, long mode
    gdt_entry(0xc093, 0, 0xfffff), // 0x10: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x18: TSS
    gdt_entry(0xc09b, 0, 0xfffff), // 0x20: code, 32-bit
];

fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: {
            let raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
            if (e >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and the identity page tables (4 GiB, 2 MiB pages).
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    let err = |_| Error::GuestWrite("GDT and page tables");
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(err)?;
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    let mut pds = vec![0u8; 4 * 4096];
    for (i, chunk) in pds.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    for d in 0..4u64 {
        mem.write_obj((PD_ADDR + d * 4096) | 3, GuestAddress(PDPT_ADDR + 8 * d))
            .map_err(err)?;
    }
    mem.write_slice(&pds, GuestAddress(PD_ADDR)).map_err(err)
}

/// General registers of the boot vCPU for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh(rip) => kvm_regs {
            rip,
            rbx: PVH_INFO_ADDR,
            rflags: 2,
            ..Default::default()
        },
        BootEntry::Linux64(rip) => kvm_regs {
            rip,
            rsi: ZERO_PAGE_ADDR,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rflags: 2,
            ..Default::default()
        },
    }
}

/// Segment and control registers of the boot vCPU for `entry`, starting from KVM's defaults.
pub fn boot_sregs(entry: BootEntry, sregs: &mut kvm_sregs) {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3);
    match entry {
        BootEntry::Pvh(_) => {
            sregs.cs = segment(4);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64(_) => {
            sregs.cs = segment(1);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Programs LINT0 as ExtINT (the 8259 reaches the BSP) and LINT1 as NMI.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 7 << 8;
    const MODE_NMI: u32 = 4 << 8;
    for (off, mode) in [(LVT_LINT0, MODE_EXTINT), (LVT_LINT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sample_cpuid() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            e(
                1,
                0,
                0x806f8,
                0x0010_0800,
                LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE | 1,
                0,
            ),
            e(4, 0, (1 << 5) | 0x121, 0, 0, 0),
            e(4, 3, (3 << 5) | 0x163, 0, 0, 0),
            e(7, 0, 0, (1 << 5) | 1, 0, 1 << 29),
            e(0xa, 0, 0x0803_0802, 0, 0, 0),
            e(0xb, 0, 0, 0, 0, 0),
            e(0xb, 1, 0, 0, 0, 0),
            e(0xd, 0, 7, 0, 0, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .copied()
            .find(|e| e.function == f && e.index == i)
    }

    #[test]
    fn cpuid_topology_and_apic_ids() {
        let c = filter_cpuid(&sample_cpuid(), 3, 4, HostQuirks::default()).unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_CX16, 0, "only hidden on PVM");
        assert_eq!(find(&c, 4, 0).unwrap().eax >> 26, 3);
        assert_eq!((find(&c, 4, 3).unwrap().eax >> 14) & 0xfff, 3);
        assert_eq!(find(&c, 0xb, 1).unwrap().ebx, 4);
        assert_eq!(find(&c, 0xb, 1).unwrap().eax, 2);
        assert_eq!(find(&c, 0xb, 0).unwrap().edx, 3);
        assert_eq!(find(&c, 0xa, 0).unwrap().eax, 0);
    }

    #[test]
    fn tsc_deadline_is_announced_when_kvm_emulates_it() {
        let without = filter_cpuid(&sample_cpuid(), 0, 1, HostQuirks::default()).unwrap();
        assert_eq!(
            find(&without, 1, 0).unwrap().ecx & LEAF1_ECX_TSC_DEADLINE,
            0
        );
        let quirks = HostQuirks {
            tsc_deadline: true,
            ..Default::default()
        };
        let with = filter_cpuid(&sample_cpuid(), 0, 1, quirks).unwrap();
        assert_ne!(find(&with, 1, 0).unwrap().ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn xsave_leaf_passes_through_with_its_features() {
        // Leaf 0xD must describe exactly the XSAVE features leaves 1 and 7 show: off PVM both
        // are KVM's, unchanged (KVM keeps 0xD's sizes in step with the guest's XCR0).
        let c = filter_cpuid(&sample_cpuid(), 0, 2, HostQuirks::default()).unwrap();
        assert_ne!(find(&c, 1, 0).unwrap().ecx & LEAF1_ECX_XSAVE, 0);
        assert_eq!(find(&c, 0xd, 0), find(&sample_cpuid(), 0xd, 0));
        assert_eq!(
            find(&c, 7, 0).unwrap().ebx,
            (1 << 5) | 1,
            "AVX2 stays with its state"
        );
    }

    #[test]
    fn pvm_hides_what_its_emulator_cannot_run() {
        let c = filter_cpuid(
            &sample_cpuid(),
            0,
            1,
            HostQuirks {
                pvm: true,
                ..Default::default()
            },
        )
        .unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ecx & (LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE), 0);
        assert_eq!(l1.ecx & 1, 1, "other features stay");
        let l7 = find(&c, 7, 0).unwrap();
        assert_eq!(l7.ebx, 1);
        assert_eq!(l7.edx, 0);
        assert!(find(&c, 0xd, 0).is_none());
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&gm).unwrap();
        let pml4: u64 = gm.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        for addr in [0u64, 0x20_0000, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = gm
                .read_obj(GuestAddress(PDPT_ADDR + 8 * (addr >> 30)))
                .unwrap();
            let pde: u64 = gm
                .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((addr >> 21) & 511)))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "present, 2 MiB page");
            assert_eq!(pde & !0x1f_ffff, addr & !0x1f_ffff);
        }
    }

    #[test]
    fn segments_decode_from_the_gdt() {
        let cs64 = segment(1);
        assert_eq!(
            (cs64.l, cs64.db, cs64.present, cs64.s, cs64.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs64.limit, 0xffff_ffff);
        let cs32 = segment(4);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(segment(2).selector, 0x10);
    }

    #[test]
    fn lint0_extint_lint1_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!(l.regs[0x351] as u8 & 7, 7);
        assert_eq!(l.regs[0x361] as u8 & 7, 4);
    }
}
