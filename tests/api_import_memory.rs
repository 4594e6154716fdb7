//! Import of a 2 GiB sparse raw image keeps `kiln serve`'s RSS growth under 64 MiB.
//!
//! The image (a file that is mostly holes, with a few MiB of data at a few offsets) is
//! streamed as the body of `POST /v1/disks/import` in 1 MiB frames read from the file, never
//! held in the test's memory; the server's VmRSS is sampled while it imports, and its VmHWM
//! (reset just before, through /proc/PID/clear_refs) read at the end. The disk's content
//! then comes back through `GET /v1/disks/{disk}/export`, compared frame by frame with the
//! file. Once stored as raw and once as qcow2.

mod common;

use common::server::Server;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::Method;
use serde_json::Value;

const SIZE: u64 = 2 << 30;
const MIB: u64 = 1 << 20;
const LIMIT_KIB: u64 = 64 << 10;

/// Where the data lies: (offset, length). Sector-aligned, not all cluster-aligned; the last
/// region ends the file.
const REGIONS: &[(u64, u64)] = &[
    (0, 4 * MIB),
    (700 * MIB + 12345 * 512, 3 * MIB),
    (1024 * MIB + 4096, MIB),
    (SIZE - 2 * MIB, 2 * MIB),
];

/// The file's data bytes: never zero, different for every region and every MiB.
fn data_byte(o: u64) -> u8 {
    (o.wrapping_mul(7).wrapping_add(o >> 20) % 255) as u8 + 1
}

fn make_image(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for &(off, len) in REGIONS {
        let buf: Vec<u8> = (off..off + len).map(data_byte).collect();
        f.write_all_at(&buf, off).unwrap();
    }
    // Mostly holes: the test would be meaningless on a file system without them.
    let allocated = std::fs::metadata(path).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(
        allocated.unwrap() < 64 * MIB,
        "the image file is not sparse"
    );
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Streams `image` into `POST /v1/disks/import` (the client reads it a MiB at a time);
/// returns the status and the JSON answer.
async fn import(s: &Server, name: &str, format: &str, image: &Path) -> (u16, Value) {
    let file = File::open(image).unwrap();
    let len = file.metadata().unwrap().len();
    let reply = s
        .client()
        .request(
            Method::POST,
            format!("/v1/disks/import?name={name}&format={format}"),
        )
        .header("content-length", &len.to_string())
        .body(
            "application/octet-stream",
            client::body::file(file, len, |_| {}),
        )
        .send()
        .await
        .unwrap();
    (
        reply.status.as_u16(),
        reply.json().unwrap_or_else(|_| Value::String(reply.text())),
    )
}

/// Streams the raw export of `name` and compares it, frame by frame, with `image`; returns
/// the length received.
async fn export_matches(s: &Server, name: &str, image: &Path) -> u64 {
    let mut body = s
        .client()
        .disk_export(name, Some(client::wire::DiskFormat::Raw))
        .await
        .unwrap_or_else(|e| panic!("export of {name}: {e}"));
    let file = File::open(image).unwrap();
    let mut want = Vec::new();
    let mut pos = 0u64;
    while let Some(data) = body.chunk().await {
        let data = data.unwrap_or_else(|e| panic!("export of {name} at {pos}: {e}"));
        assert!(
            pos + data.len() as u64 <= SIZE,
            "export of {name} is longer than {SIZE} bytes"
        );
        want.resize(data.len(), 0);
        file.read_exact_at(&mut want, pos).unwrap();
        if data[..] != want[..] {
            let i = data.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "export of {name} differs at byte {}: got {:#04x}, want {:#04x}",
                pos + i as u64,
                data[i],
                want[i]
            );
        }
        pos += data.len() as u64;
    }
    pos
}

/// RSS figures of one import, in KiB.
struct Memory {
    before: u64,
    peak_sampled: u64,
    hwm: u64,
    samples: u32,
}

/// Imports `image` as `name` in `format` while sampling the server's RSS; checks the
/// answer, the disk and its content.
fn import_and_check(
    s: &Server,
    rt: &tokio::runtime::Runtime,
    name: &str,
    format: &str,
    image: &Path,
) -> Memory {
    let pid = s.child.id();
    // Peak RSS from here on: writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = status_kib(pid, "VmRSS:");

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut peak, mut n) = (0u64, 0u32);
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS:"));
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (peak, n)
        })
    };
    let t = Instant::now();
    let (status, disk) = rt.block_on(import(s, name, format, image));
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak_sampled, samples) = sampler.join().unwrap();
    let hwm = status_kib(pid, "VmHWM:");
    let after = status_kib(pid, "VmRSS:");
    eprintln!(
        "import as {format}: {took:.1?}; VmRSS before {before} KiB, sampled peak {peak_sampled} \
         KiB ({samples} samples), VmHWM {hwm} KiB, after {after} KiB"
    );

    assert_eq!(status, 201, "import as {format}: {disk}");
    assert_eq!(disk["name"], name, "{disk}");
    assert_eq!(disk["format"], format, "{disk}");
    assert_eq!(disk["size"].as_u64(), Some(SIZE), "{disk}");
    let (st, shown) = s.json(Method::GET, &format!("/v1/disks/{name}"), Value::Null);
    assert_eq!(st, 200, "{shown}");
    assert_eq!(shown["size"].as_u64(), Some(SIZE), "{shown}");

    let t = Instant::now();
    let len = rt.block_on(export_matches(s, name, image));
    assert_eq!(len, SIZE, "export of {name}: length");
    eprintln!(
        "export of {name} ({format}) matched the file: {:.1?}",
        t.elapsed()
    );
    Memory {
        before,
        peak_sampled,
        hwm,
        samples,
    }
}

#[test]
fn import_of_a_2gib_sparse_raw_image_keeps_rss_growth_under_64mib() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.raw");
    make_image(&image);
    let s = Server::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Warm the server up (first request, first disk listing) before the baseline.
    let (st, _) = s.json(Method::GET, "/v1/disks", Value::Null);
    assert_eq!(st, 200);

    for (name, format) in [("big", "raw"), ("big-qcow2", "qcow2")] {
        let m = import_and_check(&s, &rt, name, format, &image);
        assert!(m.samples > 0, "no RSS sample during the import");
        let peak = m.peak_sampled.max(m.hwm);
        assert!(
            peak.saturating_sub(m.before) < LIMIT_KIB,
            "importing 2 GiB as {format} grew kiln serve's RSS from {} KiB to {} KiB \
             (sampled {}, VmHWM {}): more than {} KiB",
            m.before,
            peak,
            m.peak_sampled,
            m.hwm,
            LIMIT_KIB
        );
    }
}
