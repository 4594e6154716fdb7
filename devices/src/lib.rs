//! Everything the guest talks to after boot: the port-I/O and MMIO buses and the legacy
//! devices (8250 serial, i8042, CMOS RTC, ACPI power-management and reset registers).
//!
//! Devices never own KVM objects: they raise interrupts through [`Interrupt`] and ask for
//! power-off or reset through [`GuestRequests`].

#![warn(missing_docs)]

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::Arc;

pub use bus::{Bus, BusDevice};

/// A line to the guest's interrupt controller (an irqfd in Kiln, a counter in tests).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self) -> std::io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// What a guest can ask of its VM through a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// ACPI S5 soft-off.
    PowerOff,
    /// Platform reset: the VM re-boots in place.
    Reset,
}

/// Receives the guest's power-off and reset requests.
pub trait GuestRequests: Send + Sync {
    /// Called from the vCPU thread that performed the access.
    fn request(&self, what: GuestRequest, how: &'static str);
}

/// Shared handle to a [`GuestRequests`] receiver.
pub type RequestSink = Arc<dyn GuestRequests>;

/// Standard legacy device placement on the PC.
pub mod legacy {
    /// COM1 I/O base and IRQ.
    pub const COM1: (u16, u8) = (0x3f8, 4);
    /// i8042 data port (the command port is at +4).
    pub const I8042_PORT: u16 = 0x60;
    /// CMOS index/data ports and the RTC IRQ.
    pub const CMOS: (u16, u8) = (0x70, 8);
    /// ACPI PM1a event block (status, enable): 4 bytes.
    pub const PM1A_EVT: u16 = 0x600;
    /// ACPI PM1a control block: 2 bytes.
    pub const PM1A_CNT: u16 = 0x604;
    /// ACPI reset register, and the value that resets.
    pub const RESET: (u16, u8) = (0xcf9, 0x06);
    /// The SCI's ISA IRQ.
    pub const SCI_IRQ: u8 = 9;
}
