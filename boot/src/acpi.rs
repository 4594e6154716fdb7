//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT and DSDT, written into the BIOS area.
//!
//! The platform is a classic (not hardware-reduced) ACPI machine: PM1 event/control registers in
//! I/O space, the fixed-feature power button, a reset register and the SCI on an ISA IRQ.

use acpi_tables::{aml, fadt, rsdp::Rsdp, sdt::Sdt, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR};
use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"KILN  ";
const OEM_TABLE_ID: [u8; 8] = *b"KILNVM  ";
const OEM_REVISION: u32 = 1;

/// Sleep type value written to PM1_CNT.SLP_TYP for S5 (soft off), as `\_S5_` declares it.
pub const S5_SLEEP_TYPE: u8 = 5;

/// The platform registers and interrupts the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (one LAPIC entry each, APIC ids 0..n).
    pub vcpus: u8,
    /// I/O port of the PM1a event block (4 bytes: status, enable).
    pub pm1a_evt_port: u16,
    /// I/O port of the PM1a control block (2 bytes).
    pub pm1a_cnt_port: u16,
    /// I/O port of the reset register.
    pub reset_port: u16,
    /// Value the guest writes to the reset register.
    pub reset_value: u8,
    /// ISA IRQ of the SCI.
    pub sci_irq: u8,
    /// Legacy serial ports described in the DSDT: (I/O base, IRQ).
    pub serial_ports: Vec<(u16, u8)>,
    /// CMOS RTC: (I/O base, IRQ), if the machine has one.
    pub rtc: Option<(u16, u8)>,
    /// virtio-mmio devices: (MMIO base, length, GSI).
    pub virtio_mmio: Vec<(u64, u64, u32)>,
}

/// Where the tables were written.
#[derive(Clone, Copy, Debug)]
pub struct AcpiTables {
    /// Address of the RSDP (for PVH `rsdp_paddr` and the zero page `acpi_rsdp_addr`).
    pub rsdp: GuestAddress,
    /// First byte past the last table.
    pub end: GuestAddress,
}

/// Bytes of one ACPI object (or table) as AML.
fn bytes_of(obj: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    v
}

/// Builds the DSDT's AML body.
pub fn dsdt_aml(cfg: &AcpiConfig) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = Vec::new();
    for (i, &(base, irq)) in cfg.serial_ports.iter().enumerate() {
        let io = aml::IO::new(base, base, 1, 8);
        let int = aml::Interrupt::new(true, true, false, false, irq.into());
        let crs = aml::ResourceTemplate::new(vec![&io, &int]);
        devices.push(bytes_of(&aml::Device::new(
            format!("COM{}", i + 1).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )));
    }
    if let Some((base, irq)) = cfg.rtc {
        let io = aml::IO::new(base, base, 1, 2);
        let int = aml::Interrupt::new(true, true, false, false, irq.into());
        let crs = aml::ResourceTemplate::new(vec![&io, &int]);
        devices.push(bytes_of(&aml::Device::new(
            "RTC0".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )));
    }
    for (i, &(base, len, gsi)) in cfg.virtio_mmio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, base as u32, len as u32);
        let int = aml::Interrupt::new(true, true, false, false, gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
        devices.push(bytes_of(&aml::Device::new(
            format!("V{:03X}", i).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )));
    }
    let children: Vec<RawAml> = devices.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    let mut body = bytes_of(&aml::Scope::new("\\_SB_".into(), refs));
    // \_S5_: the sleep type of soft-off; the other package members are unused.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]);
    body.extend(bytes_of(&aml::Name::new("_S5_".into(), &s5)));
    body
}

/// Pre-encoded AML, so that children built in a loop can be handed to a parent.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn sdt_with(signature: [u8; 4], revision: u8, body: &[u8]) -> Sdt {
    let mut sdt = Sdt::new(signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(body);
    sdt
}

/// Builds the MADT: one enabled local APIC per vCPU, the IOAPIC, ISA overrides for the IRQs
/// [`crate::irq`] wires to another pin (the timer) and for the SCI (level, active high), and
/// LINT1 as NMI.
pub fn madt(cfg: &AcpiConfig) -> Sdt {
    let mut body = Vec::new();
    body.extend((LAPIC_ADDR as u32).to_le_bytes());
    body.extend(1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s too.
    for id in 0..cfg.vcpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, flags = enabled.
        body.extend([0, 8, id, id]);
        body.extend(1u32.to_le_bytes());
    }
    // IOAPIC: type 1, length 12, id, reserved, address, GSI base. Its id follows the LAPIC ids.
    body.extend([1, 12, cfg.vcpus, 0]);
    body.extend((IOAPIC_ADDR as u32).to_le_bytes());
    body.extend(0u32.to_le_bytes());
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source, GSI, flags.
    let iso = |source: u8, gsi: u32, flags: u16| {
        let mut e = vec![2, 10, 0, source];
        e.extend(gsi.to_le_bytes());
        e.extend(flags.to_le_bytes());
        e
    };
    for (irq, pin) in crate::irq::isa_overrides() {
        body.extend(iso(irq, pin, 0));
    }
    body.extend(iso(
        cfg.sci_irq,
        crate::irq::isa_irq_pin(cfg.sci_irq),
        0x000d,
    ));
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    body.extend([4, 6, 0xff, 0, 0, 1]);
    sdt_with(*b"APIC", 3, &body)
}

/// Builds the FADT pointing at `dsdt` and `facs`.
pub fn fadt(cfg: &AcpiConfig, dsdt: u64, facs: u64) -> fadt::FADT {
    use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
    let mut f = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(fadt::Flags::Wbinvd)
        .flag(fadt::Flags::SlpButton) // no fixed sleep button; the power button is fixed
        .flag(fadt::Flags::ResetRegSup);
    f.sci_int = u16::from(cfg.sci_irq).into();
    f.pm1a_evt_blk = u32::from(cfg.pm1a_evt_port).into();
    f.pm1a_cnt_blk = u32::from(cfg.pm1a_cnt_port).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        cfg.pm1a_evt_port.into(),
    );
    f.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        cfg.pm1a_cnt_port.into(),
    );
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        cfg.reset_port.into(),
    );
    f.reset_value = cfg.reset_value;
    // IA-PC boot architecture: an 8042 is present, no VGA.
    f.iapc_boot_arch = 0x0006.into();
    f.finalize()
}

/// A FACS (firmware control structure): no checksum, 64 bytes, must be 64-byte aligned.
fn facs() -> [u8; 64] {
    let mut t = [0u8; 64];
    t[0..4].copy_from_slice(b"FACS");
    t[4..8].copy_from_slice(&64u32.to_le_bytes());
    t[32] = 2; // version
    t
}

/// Writes all tables into guest memory from [`ACPI_START`], RSDP first.
pub fn write_tables<M: GuestMemoryBackend>(mem: &M, cfg: &AcpiConfig) -> Result<AcpiTables> {
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64, 64);
    let put = |bytes: &[u8], next: &mut u64| -> Result<u64> {
        let at = *next;
        if at + bytes.len() as u64 > BIOS_END {
            return Err(Error::AcpiTooLarge);
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|_| Error::GuestWrite("ACPI tables"))?;
        *next = align(at + bytes.len() as u64, 64);
        Ok(at)
    };

    let facs_addr = put(&facs(), &mut next)?;
    let dsdt = sdt_with(*b"DSDT", 2, &dsdt_aml(cfg));
    let dsdt_addr = put(dsdt.as_slice(), &mut next)?;
    let fadt_addr = put(&bytes_of(&fadt(cfg, dsdt_addr, facs_addr)), &mut next)?;
    let madt_addr = put(madt(cfg).as_slice(), &mut next)?;

    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr] {
        xsdt.append(addr);
    }
    let xsdt_addr = put(xsdt.as_slice(), &mut next)?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes_of(&rsdp), GuestAddress(rsdp_addr))
        .map_err(|_| Error::GuestWrite("RSDP"))?;
    Ok(AcpiTables {
        rsdp: GuestAddress(rsdp_addr),
        end: GuestAddress(next),
    })
}

fn align(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    pub(crate) fn config(vcpus: u8) -> AcpiConfig {
        AcpiConfig {
            vcpus,
            pm1a_evt_port: 0x600,
            pm1a_cnt_port: 0x604,
            reset_port: 0xcf9,
            reset_value: 6,
            sci_irq: 9,
            serial_ports: vec![(0x3f8, 4)],
            rtc: Some((0x70, 8)),
            virtio_mmio: vec![(0xd000_0000, 0x1000, 16), (0xd000_1000, 0x1000, 17)],
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads a whole table at `addr` by its length field.
    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 8), 4) as usize;
        read(mem, addr, len)
    }

    #[test]
    fn every_table_checksums_to_zero_and_is_reachable_from_the_rsdp() {
        let m = mem();
        let t = write_tables(&m, &config(4)).unwrap();
        let rsdp = read(&m, t.rsdp.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = table(&m, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let mut sigs = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let t = table(&m, u64_at(&xsdt, 36 + 8 * i));
            assert_eq!(sum(&t), 0, "{}", String::from_utf8_lossy(&t[0..4]));
            sigs.push(String::from_utf8_lossy(&t[0..4]).into_owned());
            if &t[0..4] == b"FACP" {
                let dsdt = table(&m, u64_at(&t, 140));
                assert_eq!(&dsdt[0..4], b"DSDT");
                assert_eq!(sum(&dsdt), 0);
                let facs = read(&m, u64_at(&t, 132), 64);
                assert_eq!(&facs[0..4], b"FACS");
                assert_eq!(u64_at(&t, 132) % 64, 0);
                // PM registers and SCI as configured.
                assert_eq!(u32_at(&t, 56), 0x600);
                assert_eq!(u32_at(&t, 64), 0x604);
                assert_eq!(t[46], 9);
                assert_eq!(t[128], 6); // reset value
                assert_eq!(u64_at(&t, 116 + 4), 0xcf9); // reset register address
            }
        }
        assert_eq!(sigs, ["FACP", "APIC"]);
        assert!(t.end.0 <= BIOS_END);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        for n in [1u8, 2, 7, 64] {
            let madt = madt(&config(n));
            let b = madt.as_slice();
            assert_eq!(sum(b), 0);
            let mut lapics = Vec::new();
            let mut ioapics = 0;
            let mut off = 44;
            while off < b.len() {
                let (kind, len) = (b[off], b[off + 1] as usize);
                assert!(len >= 2);
                match kind {
                    0 => {
                        assert_eq!(u32_at(b, off + 4) & 1, 1);
                        lapics.push(b[off + 3]);
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(b, off + 4), IOAPIC_ADDR as u32);
                    }
                    _ => {}
                }
                off += len;
            }
            assert_eq!(off, b.len());
            assert_eq!(lapics, (0..n).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn dsdt_decompiles_cleanly_with_iasl() {
        let dsdt = sdt_with(*b"DSDT", 2, &dsdt_aml(&config(2)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.dat");
        std::fs::write(&path, dsdt.as_slice()).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .output()
            .expect("iasl (Debian package acpica-tools) must be installed");
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d failed: {log}");
        assert!(!log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for want in [
            "PNP0501",
            "0x03F8",
            "PNP0B00",
            "_S5_",
            "LNRO0005",
            "0xD0000000",
        ] {
            assert!(dsl.contains(want), "{want} missing from:\n{dsl}");
        }
    }
}
