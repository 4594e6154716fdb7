//! Port-I/O and MMIO buses: address ranges mapped to devices. Accesses nobody claims are
//! answered harmlessly (reads return all-ones) and counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Error inserting a device.
#[derive(Debug, PartialEq, Eq)]
pub struct Overlap {
    /// Start of the range that was refused.
    pub base: u64,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bus range at {:#x} overlaps another device", self.base)
    }
}

impl std::error::Error for Overlap {}

/// An address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `dev`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base })?;
        if len == 0 {
            return Err(Overlap { base });
        }
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(Overlap { base });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (size, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + len as u64 <= *size).then_some((offset, dev))
    }

    /// Dispatches a read; unclaimed reads return all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => lock(dev).read(offset, data),
            None => {
                data.fill(0xff);
                self.miss(addr, data.len(), "read");
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => lock(dev).write(offset, data),
            None => self.miss(addr, data.len(), "write"),
        }
    }

    fn miss(&self, addr: u64, len: usize, what: &str) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // Guests probe many absent devices (and Linux writes port 0x80 for delays): log a few.
        if n < 16 {
            tracing::debug!(
                addr = format_args!("{addr:#x}"),
                len,
                "unhandled guest {what}"
            );
        }
    }

    /// Number of accesses no device claimed.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one access must not wedge the
/// other vCPUs of the VM (the VM is failed by its owner anyway).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_and_all_ones_elsewhere() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, &[0x41]);
        assert_eq!(dev.lock().unwrap().0, vec![(0, vec![0x41])]);
        let mut w = [0u8; 2];
        bus.read(0x3ff, &mut w); // straddles the end
        assert_eq!(w, [0xff, 0xff]);
        bus.read(0x80, &mut b);
        assert_eq!(b, [0xff]);
        bus.write(0x80, &[1]);
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Echo(vec![]))) as SharedDevice;
        bus.insert(0x100, 0x10, d()).unwrap();
        assert!(bus.insert(0x108, 0x10, d()).is_err());
        assert!(bus.insert(0xf8, 0x10, d()).is_err());
        assert!(bus.insert(0x100, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x110, 0x10, d()).unwrap();
        bus.insert(0xf0, 0x10, d()).unwrap();
    }
}
