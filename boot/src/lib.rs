//! Everything Kiln writes into guest memory before the first instruction: the memory layout,
//! the kernel and initrd, the command line, PVH start info or the zero page with the E820 map,
//! the MP table, the ACPI tables and the initial vCPU state.

#![warn(missing_docs)]

pub mod acpi;
pub mod cpu;
pub mod irq;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod params;

/// Errors while preparing a guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is neither an ELF nor a bzImage.
    #[error("not a kernel: expected an ELF vmlinux or a bzImage")]
    NotAKernel,
    /// The kernel image could not be loaded.
    #[error("cannot load the kernel: {0}")]
    KernelLoad(String),
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("the initrd does not fit in guest memory; give the VM more memory")]
    InitrdTooLarge,
    /// The command line is too long.
    #[error("the kernel command line is {0} bytes; at most {1} are allowed")]
    CmdlineTooLong(usize, usize),
    /// The command line is malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The ACPI tables do not fit in the BIOS area.
    #[error("the ACPI tables do not fit in the BIOS area")]
    AcpiTooLarge,
    /// Too many vCPUs for the boot tables.
    #[error("{0} vCPUs do not fit in the boot tables")]
    TooManyVcpus(u32),
    /// CPUID could not be built.
    #[error("cannot build the CPUID table")]
    Cpuid,
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Result of boot preparation.
pub type Result<T> = std::result::Result<T, Error>;
