//! A VM's configuration and its validation against the host.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use boot::layout::{CMDLINE_MAX, MIN_MEMORY};

use crate::host::Host;

/// Where the kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelImage {
    /// A file on the host.
    File(PathBuf),
    /// An image held in memory (the probe guest embedded in the binary: `Bytes::from_static`
    /// shares it with the binary instead of copying it to the heap).
    Bytes(bytes::Bytes),
}

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The kernel (ELF vmlinux or bzImage).
    pub kernel: KernelImage,
    /// An initrd, loaded as the kernel's first module.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// virtio-blk disks, in the order the guest finds them.
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in the order the guest finds them (after the disks).
    pub nets: Vec<NetConfig>,
    /// An in-kernel i8254 PIT (KVM's). Linux with kvm-clock and the TSC-deadline LAPIC timer
    /// (which Kiln announces) never uses one, and destroying it makes closing a VM take
    /// 15–20 ms; a guest that counts on the PIT (a kernel without kvm-clock) needs it.
    pub pit: bool,
}

/// A disk image attached as virtio-blk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// The image file (raw or qcow2).
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// What GET_ID returns (at most 20 bytes).
    pub serial: String,
    /// Directories a qcow2 backing file may lie in; empty: the image's own directory.
    pub backing_dirs: Vec<PathBuf>,
    /// Logical block size the guest is told: 512 or 4096.
    pub block_size: u32,
}

impl DiskConfig {
    /// How the image and its backing chain are opened: backing files only from
    /// `backing_dirs`, or the image's own directory when there are none.
    pub fn open_options(&self) -> images::OpenOptions {
        let allowed_dirs = if self.backing_dirs.is_empty() {
            vec![self
                .path
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default()]
        } else {
            self.backing_dirs.clone()
        };
        images::OpenOptions {
            allowed_dirs,
            ..Default::default()
        }
    }
}

/// A NIC on a host TAP device.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The TAP device (created if missing).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// Most virtio devices a VM can have (one IOAPIC pin each, GSIs 16–23).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// A NIC's MAC address: written and parsed as `aa:bb:cc:dd:ee:ff`; never multicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut mac = [0u8; 6];
        let filled = rustix::rand::getrandom(&mut mac, rustix::rand::GetRandomFlags::empty());
        if filled != Ok(mac.len()) {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            mac.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        mac[0] = (mac[0] & 0xfe) | 0x02;
        Self(mac)
    }

    /// The six bytes, first on the wire first.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// The address of these six bytes; `None` for a multicast one.
    pub fn from_octets(mac: [u8; 6]) -> Option<Self> {
        (mac[0] & 1 == 0).then_some(Self(mac))
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses are refused.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut mac = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC {s:?}: expected six hex bytes like 02:00:00:00:00:01"
            ));
        }
        for (b, p) in mac.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("invalid MAC {s:?}: {p:?} is not a hex byte"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "invalid MAC {s:?}: a multicast address cannot be a NIC's"
            ));
        }
        Ok(Self(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A configuration the host cannot run, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No vCPUs.
    #[error("a VM needs at least 1 vCPU")]
    NoVcpus,
    /// More vCPUs than KVM allows.
    #[error("{0} vCPUs requested but this host's KVM allows at most {1}")]
    TooManyVcpus(usize, u8),
    /// Too little memory.
    #[error("{0} bytes of memory is too little; give the VM at least {min} MiB", min = MIN_MEMORY >> 20)]
    TooLittleMemory(u64),
    /// More memory than the host has.
    #[error("{} MiB of memory requested but the host has only {} MiB", .0 >> 20, .1 >> 20)]
    TooMuchMemory(u64, u64),
    /// The kernel file cannot be read.
    #[error("cannot read kernel {0}: {1}")]
    KernelFile(PathBuf, std::io::Error),
    /// The kernel file is not a kernel.
    #[error("{0} is not a kernel: expected an ELF vmlinux or a bzImage")]
    NotAKernel(String),
    /// The initrd file cannot be read.
    #[error("cannot read initrd {0}: {1}")]
    InitrdFile(PathBuf, std::io::Error),
    /// The command line is too long.
    #[error("the kernel command line is {0} bytes; at most {CMDLINE_MAX} are allowed")]
    CmdlineTooLong(usize),
    /// The command line has characters a kernel command line cannot carry.
    #[error("the kernel command line: {0}")]
    CmdlineChars(String),
    /// A disk image cannot be used.
    #[error("disk {path}: {reason}")]
    Disk {
        /// Which disk (0 for the first).
        index: usize,
        /// Its image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A NIC cannot be used.
    #[error("NIC on TAP {tap:?}: {reason}")]
    Net {
        /// Which NIC (0 for the first).
        index: usize,
        /// Its TAP device.
        tap: String,
        /// What is wrong.
        reason: String,
    },
    /// More virtio devices than the machine has interrupt lines for.
    #[error("{0} disks and NICs requested; at most {MAX_VIRTIO_DEVICES} are supported")]
    TooManyDevices(usize),
}

impl KernelImage {
    /// A short name for messages.
    pub fn describe(&self) -> String {
        match self {
            KernelImage::File(p) => p.display().to_string(),
            KernelImage::Bytes(_) => "the embedded probe guest".into(),
        }
    }
}

/// True when `image` starts like an ELF or has a bzImage header.
fn looks_like_kernel<R: Read + Seek>(image: &mut R) -> bool {
    let mut m = [0u8; 4];
    let elf = image.read_exact(&mut m).is_ok() && &m == b"\x7fELF";
    elf || (image.seek(SeekFrom::Start(0x202)).is_ok()
        && image.read_exact(&mut m).is_ok()
        && &m == b"HdrS")
}

/// Where a virtio device sits: its MMIO window and its GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of the MMIO window.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its interrupt line on the IOAPIC.
    pub gsi: u32,
}

/// First GSI given to virtio devices: above the ISA range, so no legacy device shares it.
const VIRTIO_FIRST_GSI: u32 = 16;

impl VmConfig {
    /// The virtio devices' slots: disks first, then NICs, one 4 KiB window and one GSI each.
    pub fn virtio_slots(&self) -> Vec<VirtioSlot> {
        let len = devices::virtio::mmio::MMIO_WINDOW;
        (0..self.disks.len() + self.nets.len())
            .map(|i| VirtioSlot {
                base: boot::layout::VIRTIO_MMIO_START + i as u64 * len,
                len,
                gsi: VIRTIO_FIRST_GSI + i as u32,
            })
            .collect()
    }

    /// The command line the guest gets: the configured one, plus a `virtio_mmio.device=`
    /// token per virtio device for kernels that do not read the DSDT (the ACPI tables describe
    /// the devices too).
    pub fn full_cmdline(&self) -> String {
        let mut c = self.cmdline.clone();
        for s in self.virtio_slots() {
            c.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                s.len >> 10,
                s.base,
                s.gsi
            ));
        }
        c
    }

    /// Checks what can be checked without touching a file: vCPUs and memory against `host`,
    /// the command line's length, the number of devices, disk serials and TAP names.
    pub fn check_limits(&self, host: &Host) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > host.max_vcpus {
            return Err(ConfigError::TooManyVcpus(self.vcpus.into(), host.max_vcpus));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::TooLittleMemory(self.memory));
        }
        if self.memory > host.memory {
            return Err(ConfigError::TooMuchMemory(self.memory, host.memory));
        }
        let cmdline_len = self.full_cmdline().len();
        if cmdline_len > CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(cmdline_len));
        }
        boot::params::check_cmdline_chars(&self.cmdline).map_err(ConfigError::CmdlineChars)?;
        let devices = self.disks.len() + self.nets.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for (index, d) in self.disks.iter().enumerate() {
            let disk_error = |reason| ConfigError::Disk {
                index,
                path: d.path.clone(),
                reason,
            };
            if d.serial.len() > devices::virtio::block::ID_LEN {
                return Err(disk_error(format!(
                    "serial {:?} is longer than 20 bytes",
                    d.serial
                )));
            }
            devices::virtio::block::check_block_size(d.block_size).map_err(disk_error)?;
        }
        for (index, n) in self.nets.iter().enumerate() {
            devices::virtio::tap::check_host_tap(&n.tap).map_err(|reason| ConfigError::Net {
                index,
                tap: n.tap.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Checks the configuration against `host` before anything is built: its limits
    /// ([`VmConfig::check_limits`]), then the kernel, initrd and disk files.
    pub fn validate(&self, host: &Host) -> Result<(), ConfigError> {
        self.check_limits(host)?;
        match &self.kernel {
            KernelImage::File(path) => {
                let mut f = std::fs::File::open(path)
                    .map_err(|e| ConfigError::KernelFile(path.clone(), e))?;
                if !f.metadata().is_ok_and(|m| m.is_file()) || !looks_like_kernel(&mut f) {
                    return Err(ConfigError::NotAKernel(path.display().to_string()));
                }
            }
            KernelImage::Bytes(b) => {
                if !looks_like_kernel(&mut std::io::Cursor::new(&b[..])) {
                    return Err(ConfigError::NotAKernel(self.kernel.describe()));
                }
            }
        }
        for (index, d) in self.disks.iter().enumerate() {
            let disk_error = |reason: String| ConfigError::Disk {
                index,
                path: d.path.clone(),
                reason,
            };
            let meta = std::fs::metadata(&d.path).map_err(|e| disk_error(e.to_string()))?;
            if !meta.is_file() {
                return Err(disk_error("not a regular file".into()));
            }
        }
        if let Some(path) = &self.initrd {
            let meta =
                std::fs::metadata(path).map_err(|e| ConfigError::InitrdFile(path.clone(), e))?;
            if !meta.is_file() {
                return Err(ConfigError::InitrdFile(
                    path.clone(),
                    std::io::Error::other("not a regular file"),
                ));
            }
        }
        Ok(())
    }
}

/// Parses a size: a number with an optional binary unit (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB`, `B`). A bare number is in `bare_unit` bytes (MiB for the CLI, bytes for the API).
pub fn parse_size(s: &str, bare_unit: u64) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number such as 512MiB or 2G"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let mult = match unit.trim() {
        "" => bare_unit,
        "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => {
            return Err(format!(
            "invalid size {s:?}: unknown unit {u:?}; use B, KiB, MiB, GiB or TiB (or K, M, G, T)"
        ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256", 1 << 20), Ok(256 << 20));
        assert_eq!(parse_size("256", 1), Ok(256));
        assert_eq!(parse_size("512MiB", 1), Ok(512 << 20));
        assert_eq!(parse_size("2G", 1), Ok(2 << 30));
        assert_eq!(parse_size("4096B", 1 << 20), Ok(4096));
        let e = parse_size("12XB", 1 << 20).unwrap_err();
        assert!(e.contains("unknown unit \"XB\""), "{e}");
        assert!(parse_size("MiB", 1).is_err());
        assert!(parse_size("", 1).is_err());
        assert!(parse_size("-5M", 1).is_err());
        assert!(parse_size("99999999999999999999", 1).is_err());
        assert!(parse_size("17179869184T", 1).is_err());
    }

    #[test]
    fn macs() {
        let mac: MacAddr = "02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(mac.octets(), [2, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:00:01");
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:001",
            "01:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let r = MacAddr::random().octets();
        assert_eq!(r[0] & 0x03, 0x02, "locally administered unicast");
    }
}
