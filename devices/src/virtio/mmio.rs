//! The virtio-mmio transport, register layout version 2.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, QueueState, SharedVirtioDevice, VirtioInterrupt, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::bus::lock;
use crate::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where Kiln registers the queues' ioeventfds.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e4c_494b; // "KILN"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// What a snapshot keeps of a transport: its registers, its queues' registers (the
/// transport's copies, which are what the driver set up; an active device holds the live
/// queues, see [`super::VirtioDevice::queue_states`]) and the interrupt status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// Device status register (DRIVER_OK and friends).
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: interrupts raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// The device found a queue broken (DEVICE_NEEDS_RESET shows).
    pub broken: bool,
    /// The queue registers, one per queue.
    pub queues: Vec<QueueState>,
}

/// One virtio-mmio device as the guest's vCPUs see it.
pub struct MmioTransport {
    device: SharedVirtioDevice,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, with one notification eventfd per queue (`queue_evts`, the
    /// same fds the VMM registers as ioeventfds at [`QUEUE_NOTIFY`]).
    pub fn new(
        device: SharedVirtioDevice,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, String> {
        let (device_type, device_features, sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.features() | VIRTIO_F_VERSION_1,
                d.queue_max_sizes().to_vec(),
            )
        };
        if sizes.len() != queue_evts.len() {
            return Err("one notification eventfd per queue is needed".into());
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|e| format!("queue of {s}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            device_features,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The registers, queues and interrupt status, for a snapshot.
    pub fn state(&self) -> TransportState {
        TransportState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            broken: self.interrupt.is_broken(),
            queues: self.queues.iter().map(|q| q.state()).collect(),
        }
    }

    /// Puts back the registers of a snapshot, and restarts the device with `active` (its
    /// queues, from [`super::VirtioDevice::queue_states`]) when it was running. A state that
    /// does not fit this device (queue count, sizes, features it never offered, rings outside
    /// guest memory) is refused: the snapshot is corrupt or not this machine's.
    pub fn restore(
        &mut self,
        state: &TransportState,
        active: Option<&[QueueState]>,
    ) -> Result<(), String> {
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(format!(
                "driver features {:#x} were never offered",
                state.driver_features
            ));
        }
        let to_queue = |(q, s): (&Queue, &QueueState)| {
            if s.max_size != q.max_size() {
                return Err(format!(
                    "queue size {} saved, {} offered",
                    s.max_size,
                    q.max_size()
                ));
            }
            Queue::try_from(*s).map_err(|e| format!("saved queue: {e:?}"))
        };
        let queues = self
            .queues
            .iter()
            .zip(&state.queues)
            .map(to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        let running = match active {
            Some(saved) => {
                if saved.len() != self.queues.len() {
                    return Err("the device's saved queues do not match it".into());
                }
                let live = self
                    .queues
                    .iter()
                    .zip(saved)
                    .map(to_queue)
                    .collect::<Result<Vec<_>, _>>()?;
                for (i, q) in live.iter().enumerate() {
                    if q.ready() && !q.is_valid(&self.mem) {
                        return Err(format!("queue {i} lies outside guest memory"));
                    }
                }
                Some(live)
            }
            None => None,
        };
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if let Some(queues) = running {
            let activation = Activation {
                mem: self.mem.clone(),
                queues,
                features: self.driver_features,
                interrupt: self.interrupt.clone(),
            };
            lock(&self.device)
                .activate(activation)
                .map_err(|e| format!("restarting the device: {}", e.0))?;
            // Requests made available before the snapshot and not yet taken.
            for evt in &self.queue_evts {
                let _ = evt.write(1);
            }
        }
        self.interrupt.restore(state.interrupt_status, state.broken);
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_configurable(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK sticks only when the driver accepted a subset of ours, VERSION_1 included.
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            self.status = v;
            self.activate();
            return;
        }
        self.status = v | (self.status & STATUS_NEEDS_RESET);
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            self.needs_reset("DRIVER_OK without FEATURES_OK");
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                self.needs_reset(&format!("queue {i} is outside guest memory or misaligned"));
                return;
            }
        }
        // The device takes the queues; the transport keeps fresh ones for the next set-up.
        let fresh = self
            .queues
            .iter()
            .map(|q| {
                // Same size and ready flag, so that the registers read back what was set.
                let mut fresh = Queue::new(q.max_size())?;
                fresh.set_size(q.size());
                fresh.set_ready(q.ready());
                Ok::<_, virtio_queue::Error>(fresh)
            })
            .collect::<Result<Vec<_>, _>>();
        let Ok(fresh) = fresh else {
            self.needs_reset("cannot allocate queues");
            return;
        };
        let queues = std::mem::replace(&mut self.queues, fresh);
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        };
        let result = lock(&self.device).activate(activation);
        if let Err(e) = result {
            self.needs_reset(&e.0);
            return;
        }
        // Requests the driver queued before DRIVER_OK: look at every queue once.
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            device_type = self.device_type,
            "virtio device needs reset: {why}"
        );
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.signal(INT_CONFIG);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device_type,
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| q.max_size().into()),
            0x44 => self.selected_queue().map_or(0, |q| q.ready().into()),
            0x60 => self.interrupt.status(),
            0x70 if self.interrupt.is_broken() => self.status | STATUS_NEEDS_RESET,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let configurable = self.queue_configurable();
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; forward it if it reaches us anyway.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configurable => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!(offset, "ignored virtio-mmio register write"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            lock(&self.device).read_config(offset - 0x100, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & STATUS_FAILED == 0 {
                lock(&self.device).write_config(offset - 0x100, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// Status bits a driver sets on the way to DRIVER_OK, for tests.
pub const STATUS_ALL_OK: u32 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
