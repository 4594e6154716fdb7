//! Intel MultiProcessor Specification 1.4 table, for guests that find CPUs without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::irq::{isa_irq_pin, CASCADE_IRQ, ISA_IRQS};
use crate::layout::{ACPI_START, EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::{Error, Result};

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, for `vcpus` processors
/// with APIC ids 0..vcpus, one ISA bus and the IOAPIC (id `vcpus`).
pub fn build(vcpus: u8) -> Vec<u8> {
    let table_addr = EBDA_START as u32 + 16;
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        // Processor: type 0, APIC id, APIC version, flags (enabled, BSP), signature, features.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend([0, id, 0x14, flags]);
        entries.extend(0x600u32.to_le_bytes()); // family 6
        entries.extend(0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([1, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([2, ioapic_id, 0x11, 1]);
    entries.extend((IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in (0..ISA_IRQS).filter(|&i| i != CASCADE_IRQ) {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0, IRQ, IOAPIC, pin.
        entries.extend([3, 0, 0, 0, 0, irq, ioapic_id, isa_irq_pin(irq) as u8]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, all processors.
    entries.extend([4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend(b"PCMP");
    header.extend(((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum
    header.extend(b"KILN    ");
    header.extend(b"KILNVM      ");
    header.extend(0u32.to_le_bytes()); // OEM table pointer
    header.extend(0u16.to_le_bytes()); // OEM table size
    header.extend(count.to_le_bytes());
    header.extend((LAPIC_ADDR as u32).to_le_bytes());
    header.extend([0u8; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(b"_MP_");
    fp.extend(table_addr.to_le_bytes());
    fp.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    fp[10] = checksum(&fp);
    fp.extend(table);
    fp
}

/// Writes the MP table at the start of the EBDA.
pub fn write<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<()> {
    let bytes = build(vcpus);
    if EBDA_START + bytes.len() as u64 > ACPI_START {
        return Err(Error::TooManyVcpus(vcpus.into()));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| Error::GuestWrite("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_pointer_and_table_checksum_and_count_cpus() {
        for n in [1u8, 2, 32, 254] {
            let b = build(n);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(b[0..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let table_addr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            // Walk the entries: processors are 20 bytes, everything else 8.
            let mut off = 44;
            let mut cpus = 0;
            let mut entries = 0;
            while off < t.len() {
                let len = if t[off] == 0 { 20 } else { 8 };
                if t[off] == 0 {
                    assert_eq!(t[off + 1], cpus as u8);
                    cpus += 1;
                }
                entries += 1;
                off += len;
            }
            assert_eq!(cpus, n as usize);
            assert_eq!(entries, u16::from_le_bytes([t[34], t[35]]) as usize);
            assert!(EBDA_START + b.len() as u64 <= ACPI_START);
        }
    }
}
