//! virtio-blk over an `images` backend.
//!
//! Every guest-controlled value is checked: a malformed request gets an error status when there
//! is a status byte to write it to, and is completed with no data otherwise; a queue whose
//! available ring is corrupt is marked broken (the driver must reset the device).

use std::io::{Read, Write};

use images::DiskBackend;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::guest_iov::{Direction, GuestIovecs};
use super::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, TYPE_BLOCK};
use std::sync::Arc;

const SECTOR: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data transfer of one request; larger ones fail with IOERR.
const MAX_REQUEST: usize = 32 << 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_EVENT_IDX: u64 = 1 << 29;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Length of the serial number GET_ID returns.
pub const ID_LEN: usize = 20;

/// Checks a logical block size a disk may show the guest: 512 or 4096.
pub fn check_block_size(block_size: u32) -> Result<(), String> {
    match block_size {
        512 | 4096 => Ok(()),
        n => Err(format!("block size {n}: use 512 or 4096")),
    }
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain old data, every bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// Bytes of the request header that comes before a write's data.
const HEADER_LEN: usize = std::mem::size_of::<RequestHeader>();

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain old data, every bit pattern is valid.
unsafe impl ByteValued for Segment {}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// Counters of one block device.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockStats {
    /// Requests completed.
    pub requests: u64,
    /// Requests that failed (error status or no status).
    pub errors: u64,
    /// Bytes read for the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub write_bytes: u64,
}

/// A virtio block device.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    id: [u8; ID_LEN],
    sizes: [u16; 1],
    active: Option<Active>,
    scratch: Scratch,
    stats: BlockStats,
    block_size: u32,
}

/// What the device reuses from one request to the next.
#[derive(Default)]
struct Scratch {
    /// Data copied between a mapping image (qcow2) and the guest.
    buf: Vec<u8>,
    /// The guest buffers of a raw image's request, mapped for in-place I/O.
    iov: GuestIovecs,
}

/// How a request ended.
enum Outcome {
    /// A status byte was written; `len` bytes in all went to the guest; `why` says what was
    /// wrong with a failed request.
    Done {
        len: u32,
        status: u8,
        why: &'static str,
    },
    /// The request was too broken to answer; completed with no data.
    Dropped(&'static str),
}

impl Block {
    /// A device over `disk`; `serial` (at most 20 bytes) is what GET_ID returns.
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            read_only: read_only || disk.read_only(),
            disk,
            id,
            sizes: [QUEUE_SIZE],
            active: None,
            scratch: Scratch::default(),
            stats: BlockStats::default(),
            block_size: SECTOR as u32,
        }
    }

    /// The logical block size the guest is told (`blk_size`): 512 (the default) or 4096
    /// ([`check_block_size`]). Requests stay addressed in 512-byte sectors, as virtio-blk
    /// defines.
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        if block_size == 4096 {
            self.block_size = block_size;
        }
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&self.block_size.to_le_bytes()); // blk_size
        c[36..40].copy_from_slice(&((MAX_REQUEST as u64 / SECTOR) as u32).to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c[48..52].copy_from_slice(&((MAX_REQUEST as u64 / SECTOR) as u32).to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        while let Some(chain) =
            super::next_chain(&mut active.queue, &active.mem, &active.interrupt, "block")
        {
            let head = chain.head_index();
            let outcome = execute(
                &active.mem,
                chain,
                self.disk.as_mut(),
                self.read_only,
                &self.id,
                &mut self.scratch,
                &mut self.stats,
            );
            let (len, failure) = match outcome {
                Outcome::Done { len, status, why } => (len, (status != S_OK).then_some(why)),
                Outcome::Dropped(why) => (0, Some(why)),
            };
            if let Some(why) = failure {
                self.stats.errors += 1;
                // Rate-limited: a hostile guest must not flood the host's log.
                if self.stats.errors <= 32 {
                    tracing::warn!(request = head, "virtio-blk request failed: {why}");
                }
            }
            self.stats.requests += 1;
            if !super::add_used(
                &mut active.queue,
                &active.mem,
                &active.interrupt,
                head,
                len,
                "block",
            ) {
                return;
            }
            completed = true;
        }
        if completed {
            super::notify_used(&mut active.queue, &active.mem, &active.interrupt);
        }
    }
}

/// The data of a request moved in place between a raw image and the guest's buffers (`len`
/// bytes of those going `dir`, `data` being their range); `None` when the disk is not a flat file or
/// the buffers cannot be mapped, and the caller copies instead.
fn in_place(
    disk: &dyn DiskBackend,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    iov: &mut GuestIovecs,
    dir: Direction,
    data: std::ops::Range<usize>,
    offset: u64,
) -> Option<std::io::Result<()>> {
    let file = disk.flat_file()?;
    iov.map(mem, chain, dir, data)
        .then(|| iov.transfer(file, offset, dir))
}

/// The first `len` bytes of the device's copy buffer, grown when a request needs more (it
/// keeps its largest size, at most `MAX_REQUEST`: `range` refuses longer requests).
fn copy_buffer(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Parses and carries out one request.
fn execute(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut dyn DiskBackend,
    read_only: bool,
    id: &[u8; ID_LEN],
    scratch: &mut Scratch,
    stats: &mut BlockStats,
) -> Outcome {
    let Scratch { buf, iov } = scratch;
    let buffers = chain.clone();
    let mut reader = match virtio_queue::Reader::<()>::new(mem, chain.clone()) {
        Ok(r) => r,
        Err(_) => return Outcome::Dropped("a readable descriptor is outside guest memory"),
    };
    let mut data_out = match virtio_queue::Writer::<()>::new(mem, chain) {
        Ok(w) => w,
        Err(_) => return Outcome::Dropped("a writable descriptor is outside guest memory"),
    };
    let writable = data_out.available_bytes();
    if writable == 0 {
        return Outcome::Dropped("no writable status byte");
    }
    let Ok(mut status_out) = data_out.split_at(writable - 1) else {
        return Outcome::Dropped("cannot locate the status byte");
    };
    let mut finish = |status: u8, data_len: usize, why: &'static str| {
        let _ = status_out.write_all(&[status]);
        Outcome::Done {
            len: (data_len + 1) as u32,
            status,
            why,
        }
    };
    let Ok(hdr) = reader.read_obj::<RequestHeader>() else {
        return finish(S_IOERR, 0, "no 16-byte request header");
    };
    let data_in = reader.available_bytes();
    let data_out_len = data_out.available_bytes();
    let capacity = disk.size();
    // The byte range [offset, offset + len) of a data transfer, checked against the disk.
    let range = |len: usize| -> Option<u64> {
        let offset = hdr.sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len as u64)?;
        (len > 0 && len <= MAX_REQUEST && (len as u64).is_multiple_of(SECTOR) && end <= capacity)
            .then_some(offset)
    };
    match hdr.kind {
        T_IN => {
            let Some(offset) = range(data_out_len).filter(|_| data_in == 0) else {
                return finish(S_IOERR, 0, "read: bad buffer direction, size or range");
            };
            // A raw image is read straight into the guest's buffers, else through `buf`.
            let done = match in_place(
                disk,
                mem,
                buffers,
                iov,
                Direction::ToGuest,
                0..data_out_len,
                offset,
            ) {
                Some(r) => r.is_ok(),
                None => {
                    let buf = copy_buffer(buf, data_out_len);
                    disk.read_at(buf, offset).is_ok() && data_out.write_all(buf).is_ok()
                }
            };
            if !done {
                return finish(S_IOERR, 0, "read: I/O error");
            }
            stats.read_bytes += data_out_len as u64;
            finish(S_OK, data_out_len, "")
        }
        T_OUT => {
            let Some(offset) = range(data_in).filter(|_| data_out_len == 0) else {
                return finish(S_IOERR, 0, "write: bad buffer direction, size or range");
            };
            if read_only {
                return finish(S_IOERR, 0, "write to a read-only disk");
            }
            // A raw image is written straight from the guest's buffers, else through `buf`.
            let done = match in_place(
                disk,
                mem,
                buffers,
                iov,
                Direction::FromGuest,
                HEADER_LEN..HEADER_LEN + data_in,
                offset,
            ) {
                Some(r) => r.is_ok(),
                None => {
                    let buf = copy_buffer(buf, data_in);
                    reader.read_exact(buf).is_ok() && disk.write_at(buf, offset).is_ok()
                }
            };
            if !done {
                return finish(S_IOERR, 0, "write: I/O error");
            }
            stats.write_bytes += data_in as u64;
            finish(S_OK, 0, "")
        }
        T_FLUSH => {
            let ok = read_only || disk.flush().is_ok();
            finish(if ok { S_OK } else { S_IOERR }, 0, "flush: I/O error")
        }
        T_GET_ID => {
            let n = data_out_len.min(ID_LEN);
            if n == 0 || data_out.write_all(&id[..n]).is_err() {
                return finish(S_IOERR, 0, "get-id: no writable buffer");
            }
            finish(S_OK, n, "")
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if read_only {
                return finish(S_IOERR, 0, "discard on a read-only disk");
            }
            // One segment, as the config space says (max_*_seg = 1).
            let Some(seg) = (data_in == std::mem::size_of::<Segment>())
                .then(|| reader.read_obj::<Segment>().ok())
                .flatten()
            else {
                return finish(S_IOERR, 0, "discard: not exactly one segment");
            };
            let len = u64::from(seg.num_sectors) * SECTOR;
            let in_range = seg
                .sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len).map(|end| (o, end)))
                .filter(|&(_, end)| end <= capacity && len <= MAX_REQUEST as u64);
            let Some((offset, _)) = in_range else {
                return finish(S_IOERR, 0, "discard: range outside the disk");
            };
            let r = if hdr.kind == T_DISCARD {
                disk.discard(offset, len)
            } else {
                disk.write_zeroes(offset, len)
            };
            finish(
                if r.is_ok() { S_OK } else { S_IOERR },
                0,
                "discard: I/O error",
            )
        }
        _ => finish(S_UNSUPP, 0, "unknown request type"),
    }
}

impl VirtioDevice for Block {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("requests", s.requests),
            ("errors", s.errors),
            ("read_bytes", s.read_bytes),
            ("write_bytes", s.write_bytes),
        ]
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let mut f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_EVENT_IDX;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut queue = a
            .queues
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError("virtio-blk needs its request queue".into()))?;
        if !queue.ready() {
            return Err(ActivateError("the request queue is not ready".into()));
        }
        queue.set_event_idx(a.features & F_EVENT_IDX != 0);
        self.active = Some(Active {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn disk(&mut self) -> Option<&mut dyn DiskBackend> {
        Some(self.disk.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    fn device(read_only: bool) -> (Block, tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + (i >> 9)) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let disk = images::open_disk(&path, read_only, &Default::default()).unwrap();
        (Block::new(disk, read_only, "kiln-serial-1"), dir, path)
    }

    fn header(d: &Driver, kind: u32, sector: u64) {
        d.mem
            .write_obj(
                RequestHeader {
                    kind,
                    _reserved: 0,
                    sector,
                },
                GuestAddress(HDR),
            )
            .unwrap();
    }

    /// header → data (direction by `data_flags`) → status; returns (status, used len).
    fn request(
        b: &mut Block,
        d: &mut Driver,
        kind: u32,
        sector: u64,
        len: u32,
        data_flags: u16,
    ) -> (u8, u32) {
        header(d, kind, sector);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        d.set_desc(0, HDR, 16, F_NEXT, 1);
        d.set_desc(1, BUF, len, F_NEXT | data_flags, 2);
        d.set_desc(2, STATUS, 1, F_WRITE, 0);
        d.publish(0);
        let before = d.used_idx();
        b.queue_notified(0);
        assert_eq!(d.used_idx(), before.wrapping_add(1));
        let (id, used_len) = d.used(before);
        assert_eq!(id, 0);
        (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
    }

    fn active(read_only: bool) -> (Block, Driver, tempfile::TempDir, std::path::PathBuf) {
        let (mut b, dir, path) = device(read_only);
        let d = Driver::new(16);
        let (a, _) = d.activation(1, 0);
        b.activate(a).unwrap();
        (b, d, dir, path)
    }

    #[test]
    fn event_idx_tells_the_driver_where_to_notify_next() {
        // With EVENT_IDX the driver notifies only when it passes avail_event (after the used
        // ring); a device that never writes it gets one notification and then silence.
        let (mut b, dir, _) = device(false);
        let mut d = Driver::new(16);
        let (a, _) = d.activation(1, F_EVENT_IDX | (1 << 32));
        b.activate(a).unwrap();
        for n in 1..=3u16 {
            let (st, _) = request(&mut b, &mut d, T_IN, 0, 512, F_WRITE);
            assert_eq!(st, S_OK);
            let avail_event: u16 = d
                .mem
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(d.size)))
                .unwrap();
            assert_eq!(avail_event, n, "after request {n}");
        }
        drop(dir);
    }

    #[test]
    fn read_write_flush_get_id() {
        let (mut b, mut d, _dir, path) = active(false);
        let (st, len) = request(&mut b, &mut d, T_IN, 2, 1024, F_WRITE);
        assert_eq!((st, len), (S_OK, 1025));
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        let want: Vec<u8> = (1024..2048u32).map(|i| (i * 7 + (i >> 9)) as u8).collect();
        assert_eq!(got, want);

        d.mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut b, &mut d, T_OUT, 10, 512, 0).0, S_OK);
        assert_eq!(request(&mut b, &mut d, T_FLUSH, 0, 0, 0).0, S_OK);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[5120..5632], &[0xab; 512][..]);

        let (st, len) = request(&mut b, &mut d, T_GET_ID, 0, 20, F_WRITE);
        assert_eq!((st, len), (S_OK, 21));
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..13], b"kiln-serial-1");
        assert!(d.irq.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
    }

    #[test]
    fn raw_data_moves_in_place_across_scattered_buffers_and_a_shrunk_file() {
        // A raw image is read and written straight to and from the guest's buffers: the data
        // may share a descriptor with the header or the status byte and span several.
        let (mut b, mut d, _dir, path) = active(false);
        let pattern = |i: u32| (i * 7 + (i >> 9)) as u8;
        let publish = |b: &mut Block, d: &mut Driver| {
            d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            d.publish(0);
            let before = d.used_idx();
            b.queue_notified(0);
            d.used(before)
        };
        // Write: header + 512 data bytes in one descriptor, 1024 more in a second.
        let (hdr, more) = (DATA + 0x4000, DATA + 0x6000);
        d.mem
            .write_obj(
                RequestHeader {
                    kind: T_OUT,
                    _reserved: 0,
                    sector: 4,
                },
                GuestAddress(hdr),
            )
            .unwrap();
        d.mem
            .write_slice(&[0x11; 512], GuestAddress(hdr + 16))
            .unwrap();
        d.mem
            .write_slice(&[0x22; 1024], GuestAddress(more))
            .unwrap();
        d.set_desc(0, hdr, 16 + 512, F_NEXT, 1);
        d.set_desc(1, more, 1024, F_NEXT, 2);
        d.set_desc(2, STATUS, 1, F_WRITE, 0);
        publish(&mut b, &mut d);
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[2048..2560], &[0x11; 512][..]);
        assert_eq!(&file[2560..3584], &[0x22; 1024][..]);
        assert_eq!(file[3584], pattern(3584), "the byte after the write");

        // Read: 512 bytes in one buffer, then 512 more with the status byte after them in the
        // same descriptor.
        header(&d, T_IN, 4);
        d.set_desc(0, HDR, 16, F_NEXT, 1);
        d.set_desc(1, BUF, 512, F_NEXT | F_WRITE, 2);
        d.set_desc(2, BUF + 0x800, 513, F_WRITE, 0);
        d.mem
            .write_obj(0xffu8, GuestAddress(BUF + 0x800 + 512))
            .unwrap();
        let (_, len) = publish(&mut b, &mut d);
        assert_eq!(len, 1025);
        let mut got = vec![0u8; 512];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got[..], [0x11; 512][..]);
        d.mem
            .read_slice(&mut got, GuestAddress(BUF + 0x800))
            .unwrap();
        assert_eq!(got[..], [0x22; 512][..]);
        let status: u8 = d.mem.read_obj(GuestAddress(BUF + 0x800 + 512)).unwrap();
        assert_eq!(status, S_OK);

        // The file shrinks behind the device's back: what is gone reads as zeros.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096 + 256)
            .unwrap();
        d.mem.write_slice(&[0x55; 1024], GuestAddress(BUF)).unwrap();
        let (st, _) = request(&mut b, &mut d, T_IN, 8, 1024, F_WRITE);
        assert_eq!(st, S_OK);
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        let want: Vec<u8> = (4096..4096 + 256u32).map(pattern).collect();
        assert_eq!(got[..256], want[..]);
        assert!(got[256..].iter().all(|&x| x == 0), "zeros past the end");
    }

    #[test]
    fn bad_requests_get_error_statuses() {
        let (mut b, mut d, _dir, _) = active(false);
        // Past the end, not a multiple of 512, wrong direction, unknown type.
        assert_eq!(
            request(&mut b, &mut d, T_IN, 2047, 1024, F_WRITE).0,
            S_IOERR
        );
        assert_eq!(request(&mut b, &mut d, T_IN, 0, 100, F_WRITE).0, S_IOERR);
        assert_eq!(request(&mut b, &mut d, T_IN, 0, 512, 0).0, S_IOERR);
        assert_eq!(
            request(&mut b, &mut d, T_OUT, u64::MAX / 256, 512, 0).0,
            S_IOERR
        );
        assert_eq!(request(&mut b, &mut d, 0x7777, 0, 512, 0).0, S_UNSUPP);
        // Data outside guest memory: completed with nothing written.
        header(&d, T_IN, 0);
        d.set_desc(0, HDR, 16, F_NEXT, 1);
        d.set_desc(1, 0x7fff_ffff_f000, 512, F_NEXT | F_WRITE, 2);
        d.set_desc(2, STATUS, 1, F_WRITE, 0);
        d.publish(0);
        b.queue_notified(0);
        assert_eq!(d.used(d.used_idx().wrapping_sub(1)).1, 0);
        // The device still works.
        assert_eq!(request(&mut b, &mut d, T_IN, 0, 512, F_WRITE).0, S_OK);
    }

    #[test]
    fn read_only_disk_refuses_writes_and_keeps_the_file() {
        let (mut b, mut d, _dir, path) = active(true);
        assert_ne!(b.features() & F_RO, 0);
        let before = std::fs::read(&path).unwrap();
        d.mem.write_slice(&[1; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut b, &mut d, T_OUT, 0, 512, 0).0, S_IOERR);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn discard_reads_back_zeros() {
        let (mut b, mut d, _dir, _) = active(false);
        let seg = Segment {
            sector: 8,
            num_sectors: 8,
            flags: 0,
        };
        d.mem.write_obj(seg, GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut b, &mut d, T_DISCARD, 0, 16, 0).0, S_OK);
        assert_eq!(request(&mut b, &mut d, T_IN, 8, 4096, F_WRITE).0, S_OK);
        let mut got = vec![1u8; 4096];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got.iter().all(|&x| x == 0));
    }

    #[test]
    fn corrupt_avail_index_marks_the_queue_broken() {
        let (mut b, d, _dir, _) = active(false);
        let interrupt = b.active.as_ref().unwrap().interrupt.clone();
        d.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        b.queue_notified(0);
        assert!(interrupt.is_broken());
    }

    /// Writes a transport register as a vCPU would.
    fn reg(t: &mut super::super::mmio::MmioTransport, offset: u64, v: u32) {
        use crate::BusDevice;
        t.write(offset, &v.to_le_bytes());
    }

    fn transport(
        blk: &Arc<std::sync::Mutex<Block>>,
        d: &Driver,
    ) -> super::super::mmio::MmioTransport {
        let shared: super::super::SharedVirtioDevice = blk.clone();
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(d.irq.clone()));
        super::super::mmio::MmioTransport::new(shared, d.mem.clone(), interrupt, vec![evt]).unwrap()
    }

    #[test]
    fn a_device_restored_from_its_state_goes_on_where_it_was() {
        let (b, _dir, path) = device(false);
        let blk = Arc::new(std::sync::Mutex::new(b));
        let mut d = Driver::new(16);
        let mut t = transport(&blk, &d);
        // The driver's set-up, through the registers.
        reg(&mut t, 0x70, 1 | 2);
        reg(&mut t, 0x24, 1);
        reg(&mut t, 0x20, 1); // VERSION_1
        reg(&mut t, 0x70, 1 | 2 | 8);
        reg(&mut t, 0x30, 0);
        reg(&mut t, 0x38, 16);
        for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            reg(&mut t, off, addr as u32);
            reg(&mut t, off + 4, 0);
        }
        reg(&mut t, 0x44, 1);
        reg(&mut t, 0x70, super::super::mmio::STATUS_ALL_OK);
        for _ in 0..3 {
            assert_eq!(
                request(&mut blk.lock().unwrap(), &mut d, T_IN, 0, 512, F_WRITE).0,
                S_OK
            );
        }
        let state = t.state();
        let queues = blk.lock().unwrap().queue_states().unwrap();
        assert_eq!((queues[0].next_avail, queues[0].next_used), (3, 3));

        // A new device and transport (a restored VM's) over the same memory and disk.
        let disk = images::open_disk(&path, false, &Default::default()).unwrap();
        let blk2 = Arc::new(std::sync::Mutex::new(Block::new(disk, false, "x")));
        let mut t2 = transport(&blk2, &d);
        t2.restore(&state, Some(&queues)).unwrap();
        assert_eq!(t2.state(), state);
        assert_eq!(
            request(&mut blk2.lock().unwrap(), &mut d, T_IN, 0, 512, F_WRITE).0,
            S_OK
        );
        assert_eq!(d.used_idx(), 4, "the used ring went on from where it was");

        // States that do not fit the device are refused.
        let mut bad = state.clone();
        bad.driver_features |= 1 << 60;
        assert!(
            transport(&blk2, &d).restore(&bad, None).is_err(),
            "features never offered"
        );
        let mut bad = state.clone();
        bad.queues[0].max_size = 1024;
        assert!(
            transport(&blk2, &d).restore(&bad, None).is_err(),
            "another queue size"
        );
        let mut bad = state.clone();
        bad.queues.push(bad.queues[0]);
        assert!(
            transport(&blk2, &d).restore(&bad, None).is_err(),
            "another queue count"
        );
        let mut far = queues.clone();
        far[0].used_ring = 1 << 40;
        assert!(
            transport(&blk2, &d).restore(&state, Some(&far)).is_err(),
            "rings outside memory"
        );
        let mut odd = queues.clone();
        odd[0].size = 7;
        assert!(
            transport(&blk2, &d).restore(&state, Some(&odd)).is_err(),
            "a size not a power of two"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Random descriptor tables, random heads: the device never panics, never completes
        /// more than was made available, and keeps serving good requests.
        #[test]
        fn random_malformed_chains_never_panic(
            descs in proptest::collection::vec(
                (prop_oneof![
                    Just(HDR), Just(BUF), Just(STATUS), Just(0u64), Just(MEM_SIZE as u64 - 8),
                    Just(u64::MAX - 4), any::<u64>(), 0u64..(MEM_SIZE as u64)
                ],
                 prop_oneof![Just(0u32), Just(1), Just(16), Just(512), Just(u32::MAX), any::<u32>()],
                 0u16..8, 0u16..24),
                16),
            heads in proptest::collection::vec(0u16..20, 1..8),
            kind in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), Just(T_WRITE_ZEROES), any::<u32>()],
            sector in prop_oneof![Just(0u64), Just(2047), any::<u64>()],
        ) {
            let (mut b, mut d, _dir, _) = active(false);
            header(&d, kind, sector);
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                d.set_desc(i as u16, *addr, *len, *flags, *next);
            }
            for h in &heads {
                d.publish(*h);
            }
            b.queue_notified(0);
            let used = d.used_idx();
            prop_assert!(used as usize <= heads.len());
            // The device still serves a good request afterwards unless the queue broke.
            if !b.active.as_ref().unwrap().interrupt.is_broken() {
                d.avail_idx = d.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
                let (st, _) = request(&mut b, &mut d, T_IN, 0, 512, F_WRITE);
                prop_assert_eq!(st, S_OK);
            }
        }
    }
}
