//! virtio-net over a TAP device.
//!
//! RX back-pressure: a frame read from the TAP waits in the device until the guest posts a
//! receive buffer; meanwhile the TAP is not read (its readiness is edge-triggered, and the RX
//! queue notification resumes reading), so there is neither a busy loop nor an unbounded queue.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::tap::{offload, Tap, VNET_HDR_LEN};
use super::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, TYPE_NET};

/// Queue size offered to the driver (RX and TX).
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: 64 KiB of GSO payload plus Ethernet and vnet headers.
const MAX_FRAME: usize = 65_562;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_EVENT_IDX: u64 = 1 << 29;

const RX: usize = 0;
const TX: usize = 1;

/// Counters of one NIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Frames dropped (malformed, too large, TAP errors).
    pub dropped: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio network card on a TAP device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    sizes: [u16; 2],
    active: Option<Active>,
    /// A frame read from the TAP that waits for a guest receive buffer.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl Net {
    /// A NIC on `tap` with MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
            active: None,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
            stats: NetStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Moves frames from the TAP into guest receive buffers while both have some.
    fn receive(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut delivered = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("TAP {} read: {e}", self.tap.name());
                        break;
                    }
                },
            };
            let Some(chain) = super::next_chain(&mut a.rx, &a.mem, &a.interrupt, "RX") else {
                // No buffer (or a broken queue): keep the frame and stop reading until the
                // guest posts some.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            // With VERSION_1 the header carries num_buffers: one buffer per frame here.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match virtio_queue::Writer::<()>::new(&a.mem, chain) {
                Ok(mut w) if w.available_bytes() >= len => {
                    w.write_all(&self.rx_buf[..len]).map(|_| len).unwrap_or(0)
                }
                _ => 0,
            };
            if written == 0 {
                self.stats.dropped += 1;
            } else {
                self.stats.rx_frames += 1;
            }
            if !super::add_used(&mut a.rx, &a.mem, &a.interrupt, head, written as u32, "RX") {
                return;
            }
            delivered = true;
        }
        if delivered {
            super::notify_used(&mut a.rx, &a.mem, &a.interrupt);
        }
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut sent = false;
        while let Some(chain) = super::next_chain(&mut a.tx, &a.mem, &a.interrupt, "TX") {
            let head = chain.head_index();
            let frame = match virtio_queue::Reader::<()>::new(&a.mem, chain) {
                Ok(mut r) => {
                    let n = r.available_bytes();
                    if (VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                        && r.read_exact(&mut self.tx_buf[..n]).is_ok()
                    {
                        Some(n)
                    } else {
                        None
                    }
                }
                Err(_) => None,
            };
            match frame {
                Some(n) => match self.tap.write(&self.tx_buf[..n]) {
                    Ok(_) => self.stats.tx_frames += 1,
                    Err(_) => self.stats.dropped += 1,
                },
                None => self.stats.dropped += 1,
            }
            if !super::add_used(&mut a.tx, &a.mem, &a.interrupt, head, 0, "TX") {
                return;
            }
            sent = true;
        }
        if sent {
            super::notify_used(&mut a.tx, &a.mem, &a.interrupt);
        }
    }
}

impl VirtioDevice for Net {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("rx_frames", s.rx_frames),
            ("tx_frames", s.tx_frames),
            ("dropped", s.dropped),
        ]
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut queues = a.queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError(
                "virtio-net needs its RX and TX queues".into(),
            ));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError(
                "virtio-net RX and TX queues must be ready".into(),
            ));
        }
        let event_idx = a.features & F_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let mut flags = 0;
        if a.features & F_GUEST_CSUM != 0 {
            flags |= offload::CSUM;
            if a.features & F_GUEST_TSO4 != 0 {
                flags |= offload::TSO4;
            }
            if a.features & F_GUEST_TSO6 != 0 {
                flags |= offload::TSO6;
            }
            if a.features & F_GUEST_ECN != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        self.tap
            .set_offload(flags)
            .map_err(|e| ActivateError(format!("TAP offloads: {e}")))?;
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        // Frames that arrived while the device was down.
        self.receive();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }

    fn queue_notified(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        // A frame read from the TAP and not yet delivered is not kept: networks lose frames.
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state()])
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn extra_fd_ready(&mut self, _index: usize) {
        if self.active.is_some() {
            self.receive();
        } else {
            // Not started: drain so the TAP's queue does not fill up with stale frames.
            while self.tap.read(&mut self.rx_buf).is_ok() {}
        }
    }
}
