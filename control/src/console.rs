//! An instance's serial output, kept in a bounded ring that survives guest reboots and
//! restarts of the instance, addressed by absolute byte offsets. Readers that wait for more
//! are woken by a watch channel of the end offset: no thread waits per reader.
//!
//! The ring may be backed by a file ([`ConsoleRing::persist`]) so that the history outlives
//! `kiln serve`: output is appended to it as it comes, the file is cut back to the ring's
//! bytes when it reaches twice the ring's size (so it stays bounded), and a new server loads
//! its last [`CONSOLE_RING`] bytes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
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
    /// The file the history is kept in, and its length.
    file: Option<(File, u64)>,
}

impl Ring {
    /// Appends to the file; past twice the ring's size, rewrites it with the ring's bytes.
    /// A failing file is dropped (the ring in memory goes on), with one warning.
    fn save(&mut self, buf: &[u8]) {
        let Some((file, len)) = &mut self.file else {
            return;
        };
        let result = if *len + buf.len() as u64 > 2 * CONSOLE_RING as u64 {
            let (a, b) = self.bytes.as_slices();
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
                .and_then(|()| file.write_all(a))
                .and_then(|()| file.write_all(b))
                .map(|()| *len = self.bytes.len() as u64)
        } else {
            file.write_all(buf).map(|()| *len += buf.len() as u64)
        };
        if let Err(e) = result {
            tracing::warn!("console history file: {e}; keeping it in memory only");
            self.file = None;
        }
    }
}

/// The console history of one instance; clones share it.
#[derive(Clone)]
pub struct ConsoleRing {
    ring: Arc<Mutex<Ring>>,
    /// The end offset, for readers waiting for more.
    end: Arc<watch::Sender<u64>>,
    /// Set when the instance is deleted: waiting readers are woken and no longer wait.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for ConsoleRing {
    fn default() -> Self {
        Self {
            ring: Arc::default(),
            end: Arc::new(watch::channel(0).0),
            closed: Arc::default(),
        }
    }
}

impl ConsoleRing {
    /// Keeps the history in the file at `path` from now on: loads the last [`CONSOLE_RING`]
    /// bytes a previous server left there, then appends what comes.
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let keep = len.min(CONSOLE_RING as u64);
        file.seek(SeekFrom::Start(len - keep))?;
        let mut old = Vec::with_capacity(keep as usize);
        Read::by_ref(&mut file).take(keep).read_to_end(&mut old)?;
        let mut r = lock(&self.ring);
        let mut bytes: VecDeque<u8> = old.into();
        bytes.extend(r.bytes.drain(..));
        let excess = bytes.len().saturating_sub(CONSOLE_RING);
        bytes.drain(..excess);
        r.end += keep;
        r.bytes = bytes;
        r.file = Some((file, len));
        self.end.send_replace(r.end);
        Ok(())
    }

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

    /// Ends the history (its instance was deleted): readers waiting for more are woken, and
    /// none waits from now on.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.end.send_modify(|_| {});
    }

    /// Waits until there are bytes past `offset`, at most `timeout` (not at all once the
    /// history is closed); returns the end then.
    pub async fn wait_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let mut rx = self.end.subscribe();
        let closed = || self.closed.load(std::sync::atomic::Ordering::SeqCst);
        let _ = tokio::time::timeout(timeout, rx.wait_for(|end| *end > offset || closed())).await;
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
        r.save(buf);
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

    #[test]
    fn the_history_outlives_the_ring_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.console");
        let mut c = ConsoleRing::default();
        c.persist(&path).unwrap();
        c.write_all(b"first boot\n").unwrap();
        drop(c);
        // A new server: the history is back, and new output follows it.
        let mut c = ConsoleRing::default();
        c.persist(&path).unwrap();
        assert_eq!(c.read_from(0).1, b"first boot\n");
        let big = vec![b'x'; CONSOLE_RING / 3];
        for _ in 0..9 {
            c.write_all(&big).unwrap();
        }
        c.write_all(b"end").unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= 2 * CONSOLE_RING as u64, "file of {len} bytes");
        let mut again = ConsoleRing::default();
        again.persist(&path).unwrap();
        let (_, kept) = again.read_from(0);
        assert_eq!(kept.len(), CONSOLE_RING);
        assert!(kept.ends_with(b"xxend"));
        again.write_all(b"!").unwrap();
        assert!(again.tail(4).1.ends_with(b"end!"));
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
