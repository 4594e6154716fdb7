//! Loading the guest kernel (ELF vmlinux or bzImage) and the initrd into guest memory.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::{low_ram_end, HIMEM_START};
use crate::{Error, Result};

/// How the first vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, identity paging, `%rsi` = zero page.
    Linux64(u64),
}

/// What loading the kernel produced.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The entry point and protocol.
    pub entry: BootEntry,
    /// The bzImage setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// First guest address past the kernel image.
    pub end: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// `xloadflags` bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;

fn read_at<F: Read + Seek>(image: &mut F, offset: u64, buf: &mut [u8]) -> bool {
    image.seek(SeekFrom::Start(offset)).is_ok() && image.read_exact(buf).is_ok()
}

/// Loads an ELF vmlinux (PVH entry when it carries the PVH note, its 64-bit entry otherwise)
/// or a bzImage (64-bit entry) at its preferred address above 1 MiB.
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let mut magic = [0u8; 4];
    if read_at(image, 0, &mut magic) && &magic == ELF_MAGIC {
        let r = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| Error::KernelLoad(e.to_string()))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr.0),
            _ => BootEntry::Linux64(r.kernel_load.0),
        };
        return Ok(LoadedKernel {
            entry,
            setup_header: None,
            end: r.kernel_load.0 + r.kernel_end,
        });
    }
    if read_at(image, BZIMAGE_MAGIC_OFFSET, &mut magic) && &magic == BZIMAGE_MAGIC {
        let r = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| Error::KernelLoad(e.to_string()))?;
        let hdr = r
            .setup_header
            .ok_or_else(|| Error::KernelLoad("bzImage without a setup header".into()))?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::KernelLoad(
                "bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)".into(),
            ));
        }
        return Ok(LoadedKernel {
            entry: BootEntry::Linux64(r.kernel_load.0 + 0x200),
            setup_header: Some(hdr),
            end: r.kernel_end,
        });
    }
    Err(Error::NotAKernel)
}

/// Chooses where the initrd goes: as high as possible in low RAM (below `max_addr`, the
/// kernel's `initrd_addr_max` when it has one), page aligned, above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64, max_addr: u64) -> Result<u64> {
    let top = low_ram_end(mem_size).min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size).ok_or(Error::InitrdTooLarge)? & !0xfff;
    if addr < kernel_end {
        return Err(Error::InitrdTooLarge);
    }
    Ok(addr)
}

/// Loads `size` bytes of initrd at `addr`.
pub fn load_initrd<M, F>(mem: &M, addr: u64, image: &mut F, size: u64) -> Result<()>
where
    M: GuestMemoryBackend,
    F: ReadVolatile,
{
    mem.read_exact_volatile_from(GuestAddress(addr), image, size as usize)
        .map_err(|_| Error::GuestWrite("initrd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        let mem = 256 << 20;
        let a = initrd_address(mem, 0x200_0000, 10_000, u64::MAX).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 10_000 <= mem);
        assert!(mem - (a + 10_000) < 4096);
        // The kernel's initrd_addr_max caps it.
        let b = initrd_address(mem, 0x200_0000, 10_000, 0x3fff_ffff / 8).unwrap();
        assert!(b + 10_000 <= 0x3fff_ffff / 8 + 1);
        // Too large to fit above the kernel.
        assert!(initrd_address(mem, 0x200_0000, mem, u64::MAX).is_err());
        assert!(initrd_address(mem, 0x200_0000, mem - 0x100_0000, u64::MAX).is_err());
    }

    #[test]
    fn initrd_bytes_land_where_placed() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let addr = initrd_address(64 << 20, 0x40_0000, data.len() as u64, u64::MAX).unwrap();
        load_initrd(&gm, addr, &mut Cursor::new(&data[..]), data.len() as u64).unwrap();
        let mut back = vec![0; data.len()];
        gm.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let junk = vec![0x5au8; 8192];
        assert!(matches!(
            load_kernel(&gm, &mut Cursor::new(&junk[..])),
            Err(Error::NotAKernel)
        ));
        let short = b"\x7fEL";
        assert!(matches!(
            load_kernel(&gm, &mut Cursor::new(&short[..])),
            Err(Error::NotAKernel)
        ));
        // An ELF header that is truncated is reported as a load error, not a panic.
        let truncated = b"\x7fELF\x02\x01\x01\x00";
        assert!(matches!(
            load_kernel(&gm, &mut Cursor::new(&truncated[..])),
            Err(Error::KernelLoad(_))
        ));
    }
}
