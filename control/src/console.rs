//! An instance's serial output, kept in a bounded ring that survives guest reboots and
//! restarts of the instance, addressed by absolute byte offsets. Readers that wait for more
//! are woken by a watch channel of the end offset: no thread waits per reader.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use tokio::sync::watch;

/// Bytes of console history kept per instance.
pub const CONSOLE_RING: usize = 1 << 20;

#[derive(Default)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Bytes ever written: the offset one past the newest byte.
    end: u64,
}

/// The console history of one instance; clones share it.
#[derive(Clone)]
pub struct ConsoleRing {
    ring: Arc<Mutex<Ring>>,
    /// The end offset, for readers waiting for more.
    end: Arc<watch::Sender<u64>>,
}

impl Default for ConsoleRing {
    fn default() -> Self {
        Self {
            ring: Arc::default(),
            end: Arc::new(watch::channel(0).0),
        }
    }
}

impl ConsoleRing {
    /// Offset of the oldest byte kept and of the end.
    pub fn bounds(&self) -> (u64, u64) {
        let r = lock(&self.ring);
        (r.end - r.bytes.len() as u64, r.end)
    }

    /// The bytes from `from` (clamped to what is kept) to the end, and their start offset.
    pub fn read_from(&self, from: u64) -> (u64, Vec<u8>) {
        let r = lock(&self.ring);
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

    /// Waits until there are bytes past `offset`, at most `timeout`; returns the end then.
    pub async fn wait_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let mut rx = self.end.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|end| *end > offset)).await;
        let end = *rx.borrow();
        end
    }
}

impl Write for ConsoleRing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = lock(&self.ring);
        r.bytes.extend(buf);
        let excess = r.bytes.len().saturating_sub(CONSOLE_RING);
        r.bytes.drain(..excess);
        r.end += buf.len() as u64;
        // Published under the ring's lock, so that it never goes back.
        self.end.send_replace(r.end);
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
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_write() {
        let c = ConsoleRing::default();
        assert_eq!(
            c.wait_beyond(0, Duration::from_millis(1)).await,
            0,
            "times out"
        );
        let mut w = c.clone();
        let waiter = tokio::spawn(async move { c.wait_beyond(0, Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        w.write_all(b"hi").unwrap();
        assert_eq!(waiter.await.unwrap(), 2);
    }
}
