//! The boot information a kernel reads at entry: PVH start info or the Linux zero page, the
//! command line and the memory map.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::load_cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    e820_map, CMDLINE_ADDR, CMDLINE_MAX, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    ZERO_PAGE_ADDR,
};
use crate::{Error, Result};

const PVH_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;

/// What the kernel is told at entry.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Length of the command line written by [`write_cmdline`] (without the NUL).
    pub cmdline_len: usize,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// Address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Checks the characters of a kernel command line: printable ASCII only (no NUL, no
/// control characters), the one rule for `kiln run` and instance definitions.
pub fn check_cmdline_chars(cmdline: &str) -> std::result::Result<(), String> {
    match cmdline
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control())
    {
        Some(c) => Err(format!("{c:?} is not allowed: use printable ASCII only")),
        None => Ok(()),
    }
}

/// Checks and writes the kernel command line at [`CMDLINE_ADDR`]; returns its length.
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(Error::CmdlineTooLong(cmdline.len(), CMDLINE_MAX));
    }
    check_cmdline_chars(cmdline).map_err(Error::Cmdline)?;
    let cl =
        Cmdline::try_from(cmdline, CMDLINE_MAX + 1).map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(|_| Error::GuestWrite("cmdline"))?;
    Ok(cmdline.len())
}

/// Writes the PVH `hvm_start_info`, its memory map and module list; returns its address.
pub fn write_pvh<M: GuestMemoryBackend>(mem: &M, info: &BootInfo) -> Result<u64> {
    let map = e820_map(info.mem_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| Error::GuestWrite("PVH memory map"))?;
    }
    let mut start = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|_| Error::GuestWrite("PVH module list"))?;
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(start, GuestAddress(PVH_INFO_ADDR))
        .map_err(|_| Error::GuestWrite("PVH start info"))?;
    Ok(PVH_INFO_ADDR)
}

/// Builds the Linux zero page. `hdr` is the bzImage's setup header, if the kernel had one.
pub fn zero_page(info: &BootInfo, hdr: Option<setup_header>) -> Result<boot_params> {
    let mut p = boot_params::default();
    if let Some(h) = hdr {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = BOOT_FLAG;
        p.hdr.header = HDRS;
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    p.acpi_rsdp_addr = info.rsdp;
    let map = e820_map(info.mem_size);
    if map.len() > p.e820_table.len() {
        return Err(Error::GuestWrite("E820 map"));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    Ok(p)
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`]; returns its address.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
    hdr: Option<setup_header>,
) -> Result<u64> {
    mem.write_obj(zero_page(info, hdr)?, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| Error::GuestWrite("zero page"))?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn info() -> BootInfo {
        BootInfo {
            mem_size: 512 << 20,
            cmdline_len: 12,
            initrd: Some((0x1f00_0000, 12345)),
            rsdp: 0xe0000,
        }
    }

    #[test]
    fn zero_page_fields() {
        let p = zero_page(&info(), None).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 12345);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, 512 << 20);
        // Raw offsets a kernel reads (Documentation/arch/x86/zero-page.rst).
        let raw = vm_memory::ByteValued::as_slice(&p);
        assert_eq!(raw[0x1e8], 3);
        assert_eq!(
            u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()),
            CMDLINE_ADDR as u32
        );
        assert_eq!(
            u64::from_le_bytes(raw[0x70..0x78].try_into().unwrap()),
            0xe0000
        );
    }

    #[test]
    fn pvh_start_info_memmap_and_module() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let at = write_pvh(&gm, &info()).unwrap();
        let s: hvm_start_info = gm.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(s.magic, PVH_MAGIC);
        assert_eq!(s.memmap_entries, 3);
        assert_eq!(s.nr_modules, 1);
        assert_eq!(s.rsdp_paddr, 0xe0000);
        let m: hvm_modlist_entry = gm.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x1f00_0000, 12345));
        let e: hvm_memmap_table_entry = gm.read_obj(GuestAddress(s.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!(e.addr, 0x100000);
        assert_eq!(e.addr + e.size, 512 << 20);
    }

    #[test]
    fn cmdline_is_written_nul_terminated_and_limits_are_enforced() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_cmdline(&gm, "console=ttyS0 probe=acpi").unwrap(), 24);
        let mut buf = [0u8; 25];
        gm.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 probe=acpi\0");
        assert!(matches!(
            write_cmdline(&gm, &"x".repeat(CMDLINE_MAX + 1)),
            Err(Error::CmdlineTooLong(..))
        ));
        assert!(write_cmdline(&gm, "bad\u{1}char").is_err());
    }
}
