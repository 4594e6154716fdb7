//! Virtio devices over the MMIO transport (virtio 1.x, register layout version 2).
//!
//! A device is split in two halves with separate locks: the [`mmio::MmioTransport`] that vCPU
//! threads reach through the MMIO bus (registers, feature negotiation, queue set-up), and the
//! [`VirtioDevice`] that the VM's event loop drives (queue processing, backend I/O). vCPUs only
//! take the device lock to activate, reset or read config space, never while it does I/O:
//! queue notifications arrive on the event loop through ioeventfds.

pub mod block;
mod guest_iov;
pub mod mmio;
pub mod net;
pub mod tap;
#[cfg(test)]
mod testing;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
pub use virtio_queue::QueueState;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::Interrupt;

/// VIRTIO_F_VERSION_1: the device is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = 2;

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs reset).
pub const INT_CONFIG: u32 = 2;

/// The next request the driver made available on `queue`, or `None` when there is none
/// (or the queue is broken: it is marked so, `what` naming it in the log).
///
/// Before answering `None` it re-enables notifications: with `VIRTIO_F_EVENT_IDX` that
/// publishes `avail_event`, without which the driver would never notify again; a request
/// added meanwhile is then picked up instead of waiting for a notification.
pub(crate) fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    what: &str,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    loop {
        match queue.iter(mem) {
            Ok(mut it) => {
                if let Some(chain) = it.next() {
                    return Some(chain);
                }
            }
            Err(e) => {
                interrupt.mark_broken(&format!("{what} queue: {e}"));
                return None;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return None,
            Err(e) => {
                interrupt.mark_broken(&format!("{what} queue: {e}"));
                return None;
            }
        }
    }
}

/// Returns request `head` to the driver with `len` bytes written; false (and the queue
/// marked broken) when the used ring cannot be written.
pub(crate) fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    head: u16,
    len: u32,
    what: &str,
) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            interrupt.mark_broken(&format!("{what} used ring: {e}"));
            false
        }
    }
}

/// Raises the queue interrupt for requests returned, unless the driver asked not to be
/// interrupted (EVENT_IDX `used_event`, or the no-interrupt flag).
pub(crate) fn notify_used(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal(INT_VRING);
    }
}

/// The interrupt line of one virtio device and its InterruptStatus register, shared by the
/// transport (which the guest reads and acknowledges) and the device (which raises it).
pub struct VirtioInterrupt {
    status: AtomicU32,
    broken: AtomicBool,
    irq: Arc<dyn Interrupt>,
}

impl VirtioInterrupt {
    /// A line raising `irq`.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self {
            status: AtomicU32::new(0),
            broken: AtomicBool::new(false),
            irq,
        }
    }

    /// The device found its queue broken (the driver must reset it): the transport shows
    /// DEVICE_NEEDS_RESET and a configuration interrupt is raised.
    pub fn mark_broken(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio queue broken, device needs reset: {why}");
            self.signal(INT_CONFIG);
        }
    }

    /// Whether [`VirtioInterrupt::mark_broken`] was called since the last reset.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Puts back the InterruptStatus register and the broken flag of a snapshot, raising
    /// the interrupt again if one was pending (a spurious one is harmless: drivers read the
    /// status first, and the in-kernel IOAPIC may have lost an edge it never delivered).
    pub fn restore(&self, status: u32, broken: bool) {
        self.status.store(status, Ordering::Release);
        self.broken.store(broken, Ordering::Release);
        if status != 0 {
            if let Err(e) = self.irq.trigger() {
                tracing::warn!("virtio interrupt: {e}");
            }
        }
    }

    /// Device reset: no pending interrupt, not broken.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.broken.store(false, Ordering::Release);
    }
}

/// Why a device refused to start.
#[derive(Debug)]
pub struct ActivateError(pub String);

/// What a device is given when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues the driver set up, in queue-index order.
    pub queues: Vec<Queue>,
    /// Features the driver accepted.
    pub features: u64,
    /// The device's interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// A virtio device backend, driven by the VM's event loop.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Reads device config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (ignored unless the device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (driver reset).
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn queue_notified(&mut self, index: usize);
    /// The device's counters since it was made (name, value), for metrics.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The queues of an active device with their ring positions (for a snapshot); `None`
    /// while the driver has not started it. Restoring one is [`VirtioDevice::activate`]
    /// with these queues.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    /// The disk behind a block device, for taking its snapshot while the device is locked
    /// (so that no request is half done); `None` for other devices.
    fn disk(&mut self) -> Option<&mut dyn images::DiskBackend> {
        None
    }
    /// Other file descriptors the event loop should watch for this device (edge-triggered).
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of [`VirtioDevice::extra_fds`] (by index) became ready.
    fn extra_fd_ready(&mut self, _index: usize) {}
}

/// Shared handle to a device.
pub type SharedVirtioDevice = Arc<Mutex<dyn VirtioDevice>>;

const EXTRA_FD_BASE: u32 = 1 << 16;

/// The event-loop side of a device: its queue notification eventfds and extra fds.
pub struct VirtioEvents {
    device: SharedVirtioDevice,
    queue_evts: Vec<EventFd>,
    extra: Vec<RawFd>,
}

impl VirtioEvents {
    /// The device these events drive.
    pub fn device(&self) -> SharedVirtioDevice {
        self.device.clone()
    }

    /// Watches `queue_evts` (one per queue, also registered as ioeventfds) for `device`.
    pub fn new(device: SharedVirtioDevice, queue_evts: Vec<EventFd>) -> Self {
        let extra = lock(&device).extra_fds();
        Self {
            device,
            queue_evts,
            extra,
        }
    }
}

impl MutEventSubscriber for VirtioEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio queue event: {e:?}");
            }
        }
        for (i, fd) in self.extra.iter().enumerate() {
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(*fd, EXTRA_FD_BASE + i as u32, set)) {
                tracing::error!("virtio device fd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data >= EXTRA_FD_BASE {
            lock(&self.device).extra_fd_ready((data - EXTRA_FD_BASE) as usize);
        } else if let Some(evt) = self.queue_evts.get(data as usize) {
            let _ = evt.read();
            lock(&self.device).queue_notified(data as usize);
        }
    }
}
