//! An instance's serial output, kept in a bounded ring that survives guest reboots and
//! restarts of the instance, addressed by absolute byte offsets.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use devices::bus::lock;

/// Bytes of console history kept per instance.
pub const CONSOLE_RING: usize = 1 << 20;

#[derive(Default)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Bytes ever written: the offset one past the newest byte.
    end: u64,
}

/// The console history of one instance; clones share it.
#[derive(Clone, Default)]
pub struct ConsoleRing {
    ring: Arc<(Mutex<Ring>, Condvar)>,
}

impl ConsoleRing {
    /// Offset of the oldest byte kept and of the end.
    pub fn bounds(&self) -> (u64, u64) {
        let r = lock(&self.ring.0);
        (r.end - r.bytes.len() as u64, r.end)
    }

    /// The bytes from `from` (clamped to what is kept) to the end, and their start offset.
    pub fn read_from(&self, from: u64) -> (u64, Vec<u8>) {
        let r = lock(&self.ring.0);
        let start = r.end - r.bytes.len() as u64;
        let from = from.clamp(start, r.end);
        let skip = (from - start) as usize;
        (from, r.bytes.iter().skip(skip).copied().collect())
    }

    /// The last `n` bytes and their start offset.
    pub fn tail(&self, n: u64) -> (u64, Vec<u8>) {
        let end = self.bounds().1;
        self.read_from(end.saturating_sub(n))
    }

    /// Waits until there are bytes past `offset`, at most `timeout`; returns the new end.
    pub fn wait_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let (m, cv) = &*self.ring;
        let r = lock(m);
        let (r, _) = cv
            .wait_timeout_while(r, timeout, |r| r.end <= offset)
            .unwrap_or_else(|e| e.into_inner());
        r.end
    }
}

impl Write for ConsoleRing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (m, cv) = &*self.ring;
        let mut r = lock(m);
        r.bytes.extend(buf);
        let excess = r.bytes.len().saturating_sub(CONSOLE_RING);
        r.bytes.drain(..excess);
        r.end += buf.len() as u64;
        cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_wrapping() {
        let mut c = ConsoleRing::default();
        c.write_all(b"hello ").unwrap();
        assert_eq!(c.read_from(0), (0, b"hello ".to_vec()));
        let big = vec![b'x'; CONSOLE_RING];
        c.write_all(&big).unwrap();
        c.write_all(b"end").unwrap();
        let (start, end) = c.bounds();
        assert_eq!(end, 6 + CONSOLE_RING as u64 + 3);
        assert_eq!(end - start, CONSOLE_RING as u64);
        assert_eq!(c.read_from(0).0, start, "clamped to what is kept");
        assert_eq!(c.tail(3), (end - 3, b"end".to_vec()));
        assert_eq!(c.wait_beyond(0, Duration::from_millis(1)), end);
    }
}
