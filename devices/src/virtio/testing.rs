//! A minimal split-virtqueue driver over real guest memory, for device tests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Activation, VirtioInterrupt};
use crate::Interrupt;

pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
pub const DATA: u64 = 0x10000;
pub const MEM_SIZE: usize = 4 << 20;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

#[derive(Default)]
pub struct Count(pub AtomicU32);

impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    pub avail_idx: u16,
    pub irq: Arc<Count>,
}

impl Driver {
    pub fn new(size: u16) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self {
            mem,
            size,
            avail_idx: 0,
            irq: Arc::new(Count::default()),
        }
    }

    /// The queues and interrupt a device is activated with (`n` queues, same rings).
    pub fn activation(&self, n: usize, features: u64) -> (Activation, Arc<VirtioInterrupt>) {
        let interrupt = Arc::new(VirtioInterrupt::new(self.irq.clone()));
        let queues = (0..n)
            .map(|i| {
                let mut q = Queue::new(self.size).unwrap();
                let off = i as u64 * 0x10_0000;
                q.set_desc_table_address(Some((DESC + off) as u32), Some(0));
                q.set_avail_ring_address(Some((AVAIL + off) as u32), Some(0));
                q.set_used_ring_address(Some((USED + off) as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        (
            Activation {
                mem: self.mem.clone(),
                queues,
                features,
                interrupt: interrupt.clone(),
            },
            interrupt,
        )
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes the chain starting at `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// (id, len) of used element `n`.
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(n % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
