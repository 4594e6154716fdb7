//! Guest physical memory layout.
//!
//! Low memory holds the boot structures, the kernel goes at 1 MiB, RAM that does not fit
//! below the 32-bit MMIO gap continues at 4 GiB.

use vm_memory::GuestAddress;

/// Boot GDT (64-bit entry and PVH entry).
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT, loaded so that an early exception triple-faults instead of running garbage.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guests may place an AP start-up trampoline here (the probe guest does): Kiln keeps it free.
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// Identity page tables for the 64-bit entry: PML4, PDPT, then four page directories.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// First of four page directories (2 MiB pages, 4 GiB mapped).
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line Kiln passes (bytes, without the NUL).
pub const CMDLINE_MAX: usize = 4095;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9FC00;
/// ACPI tables (RSDP first, so that a scan of the BIOS area finds it).
pub const ACPI_START: u64 = 0xE0000;
/// End of the BIOS area reserved in the E820 map.
pub const BIOS_END: u64 = 0x100000;
/// Where kernels are loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x100000;
/// The 32-bit MMIO gap: [MMIO_GAP_START, 4 GiB) holds no RAM.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the 32-bit address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Start of the window where virtio-mmio devices are placed.
pub const VIRTIO_MMIO_START: u64 = 0xD000_0000;

/// Smallest guest memory Kiln accepts: room for the boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// E820 entry types.
pub mod e820 {
    /// Usable RAM.
    pub const RAM: u32 = 1;
    /// Reserved.
    pub const RESERVED: u32 = 2;
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `e820::RAM` or `e820::RESERVED`.
    pub kind: u32,
}

/// The RAM regions backing `mem_size` bytes of guest memory, split around the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(FOUR_GIB), (mem_size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Highest address (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The E820 map Kiln gives the guest: low RAM up to the EBDA, the BIOS area reserved, RAM from
/// 1 MiB, the MMIO gap implicit, and RAM above 4 GiB when the guest has more than fits below.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: e820::RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: BIOS_END - EBDA_START,
            kind: e820::RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(mem_size) - HIMEM_START,
            kind: e820::RAM,
        },
    ];
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: FOUR_GIB,
            size: mem_size - MMIO_GAP_START,
            kind: e820::RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_three_e820_entries() {
        let mem = 256 << 20;
        assert_eq!(ram_regions(mem), vec![(GuestAddress(0), mem as usize)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9FC00,
                kind: e820::RAM
            }
        );
        assert_eq!(map[1].kind, e820::RESERVED);
        assert_eq!(map[1].addr + map[1].size, 0x100000);
        assert_eq!(map[2].addr, 0x100000);
        assert_eq!(map[2].addr + map[2].size, mem);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 5 << 30;
        let regions = ram_regions(mem);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].1 as u64, MMIO_GAP_START);
        assert_eq!(regions[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(regions[1].1 as u64, mem - MMIO_GAP_START);
        let map = e820_map(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == e820::RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the reserved BIOS area is RAM, and nothing is in the gap.
        assert_eq!(ram, mem - (BIOS_END - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr >= FOUR_GIB || e.addr + e.size <= MMIO_GAP_START));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let spans = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x40),
            (PVH_MODLIST_ADDR, 0x20),
            (PVH_MEMMAP_ADDR, 0x100),
            (ZERO_PAGE_ADDR, 0x1000),
            (TRAMPOLINE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x4000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64 + 1),
        ];
        for (i, a) in spans.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &spans[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
