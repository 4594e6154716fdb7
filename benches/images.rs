//! Disk images: virtio-blk throughput of the probe guest on raw and qcow2 images, Kiln and
//! QEMU microvm side by side, and disk import/export over the Unix socket of `kiln serve`
//! against `cp`.
//!
//!     cargo bench --bench images -- [--no-qemu] [--count N] [--no-blk] [--no-api]
//!
//! (a) A 1 GiB disk: sequential reads and writes of the whole disk in 256 KiB requests
//! (`blk-bench`) and N (default 16384) random 4 KiB reads and writes (`blk-rbench`), timed on
//! the host between the probe's PROBE-BENCH-START and PROBE-BENCH-END lines. Images: a raw
//! file written in full beforehand; a fresh qcow2 from `qemu-img create -f qcow2` (reads of
//! an empty image, allocating writes); the same qcow2 once the sequential write filled it.
//! Fresh random writes get their own fresh qcow2. QEMU runs with its default drive cache
//! (writeback, thread pool). Nothing is dropped from the host's page cache.
//!
//! (b) `POST /v1/disks/import` and `GET /v1/disks/{disk}/export` through `kiln serve`'s
//! Unix socket with a streamed body (1 MiB frames read from a file, as `kiln disk import`
//! does), for a 1 GiB file of non-zero bytes and a 4 GiB file that is mostly holes, stored as
//! raw and as qcow2. The export is written into a file, skipping all-zero frames (as
//! `kiln disk export` does). MB/s are of the file's (disk's) length. Compared with `cp` of
//! the same file, and `cp` followed by an fsync of the copy (the import fsyncs its result).
//! The source files stay in the page cache throughout: nothing is dropped.
//!
//! Files go to /var/tmp/kiln-bench-images (about 7 GiB at the peak; removed at the end).

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    arg, bench_run, has, mbps, probe_elf, qemu_microvm, strings, BenchResult, Microvm, Serve,
};

const DIR: &str = "/var/tmp/kiln-bench-images";
const DISK_MIB: u64 = 1024;
const SEQ_KB: u64 = 256;
const RAND_KB: u64 = 4;

fn run_ok(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

// ---------------------------------------------------------------------------------------
// (a) virtio-blk in the probe guest

/// The probe's commands, the guest's terminator excepted.
#[derive(Clone, Copy)]
enum Op {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl Op {
    fn cmd(self, count: u64) -> String {
        match self {
            Op::SeqRead => format!("blk-bench:0:{DISK_MIB}:{SEQ_KB}:r"),
            Op::SeqWrite => format!("blk-bench:0:{DISK_MIB}:{SEQ_KB}:w"),
            Op::RandRead => format!("blk-rbench:0:{DISK_MIB}:{RAND_KB}:r:{count}"),
            Op::RandWrite => format!("blk-rbench:0:{DISK_MIB}:{RAND_KB}:w:{count}"),
        }
    }

    fn column(self) -> usize {
        match self {
            Op::SeqWrite => 0,
            Op::SeqRead => 1,
            Op::RandWrite => 2,
            Op::RandRead => 3,
        }
    }
}

/// How an image is prepared before a run.
#[derive(Clone, Copy, PartialEq)]
enum Prep {
    /// Written in full (kept between runs).
    RawFull,
    /// A new `qemu-img create -f qcow2` image.
    FreshQcow2,
}

/// The guest command line and the VMM command for `subject` on `img`.
fn vmm_cmd(subject: &str, probe: &Path, img: &Path, fmt: &str, cmds: &str) -> Vec<String> {
    if subject == "kiln" {
        let mut v = strings(&[env!("CARGO_BIN_EXE_kiln"), "run", "--memory", "256MiB"]);
        v.push("--disk".into());
        v.push(format!("path={}", img.display()));
        v.push("--cmdline".into());
        v.push(format!("console=ttyS0 probe={cmds},poweroff"));
        v
    } else {
        // microvm adds the virtio_mmio.device= token of the disk to the command line itself.
        qemu_microvm(
            probe,
            Microvm {
                machine: "microvm,acpi=off",
                smp: None,
                memory_mib: 256,
                modern_virtio: true,
                devices: vec![
                    "-drive".into(),
                    format!("if=none,id=d0,file={},format={fmt}", img.display()),
                    "-device".into(),
                    "virtio-blk-device,drive=d0".into(),
                ],
                // No ACPI power-off on microvm,acpi=off: a triple fault ends QEMU (-no-reboot).
                append: format!("console=ttyS0 probe={cmds},triplefault"),
            },
        )
    }
}

fn prepare(prep: Prep, img: &Path) {
    match prep {
        Prep::RawFull => {
            if img.metadata().is_ok_and(|m| m.len() == DISK_MIB << 20) {
                return;
            }
            run_ok(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={}", img.display()),
                    "bs=1M",
                    &format!("count={DISK_MIB}"),
                    "conv=fsync",
                    "status=none",
                ],
            );
        }
        Prep::FreshQcow2 => {
            let _ = std::fs::remove_file(img);
            run_ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    img.to_str().unwrap(),
                    &format!("{DISK_MIB}M"),
                ],
            );
        }
    }
}

/// A table row: four cells (seq write, seq read, rand write, rand read).
struct Row {
    subject: &'static str,
    image: &'static str,
    cells: [Option<BenchResult>; 4],
}

fn blk(with_qemu: bool, count: u64) {
    let probe = probe_elf();
    let dir = Path::new(DIR);
    let subjects: &[&'static str] = if with_qemu {
        &["kiln", "qemu-microvm"]
    } else {
        &["kiln"]
    };
    use Op::*;
    const RAW: &str = "raw (written)";
    const FRESH: &str = "qcow2 fresh";
    const FILLED: &str = "qcow2 filled";
    // One boot each: (file, format, preparation, [(row, op)]). b.qcow2 starts empty; its
    // sequential write fills it for the "filled" operations that follow in the same boot.
    type Boot = (&'static str, &'static str, Prep, Vec<(&'static str, Op)>);
    let boots: Vec<Boot> = vec![
        (
            "disk.raw",
            "raw",
            Prep::RawFull,
            vec![
                (RAW, SeqRead),
                (RAW, SeqWrite),
                (RAW, RandRead),
                (RAW, RandWrite),
            ],
        ),
        (
            "a.qcow2",
            "qcow2",
            Prep::FreshQcow2,
            vec![(FRESH, RandWrite)],
        ),
        (
            "b.qcow2",
            "qcow2",
            Prep::FreshQcow2,
            vec![
                (FRESH, SeqRead),
                (FRESH, RandRead),
                (FRESH, SeqWrite),
                (FILLED, SeqRead),
                (FILLED, RandRead),
                (FILLED, RandWrite),
                (FILLED, SeqWrite),
            ],
        ),
    ];
    let mut rows: Vec<Row> = Vec::new();
    for (subject, (file, fmt, prep, ops)) in subjects
        .iter()
        .flat_map(|s| boots.iter().map(move |b| (*s, b)))
    {
        let img = dir.join(file);
        prepare(*prep, &img);
        let cmds: Vec<String> = ops.iter().map(|(_, o)| o.cmd(count)).collect();
        let cmd = vmm_cmd(subject, &probe, &img, fmt, &cmds.join(","));
        let results = bench_run(&cmd, Duration::from_secs(1800));
        for (k, (label, op)) in ops.iter().enumerate() {
            let r = results
                .get(k)
                .cloned()
                .unwrap_or_else(|| Err("no result".into()));
            let p = match rows
                .iter()
                .position(|r| r.subject == subject && r.image == *label)
            {
                Some(p) => p,
                None => {
                    rows.push(Row {
                        subject,
                        image: label,
                        cells: [None, None, None, None],
                    });
                    rows.len() - 1
                }
            };
            rows[p].cells[op.column()] = Some(r);
        }
    }
    rows.sort_by_key(|r| {
        let img = [RAW, FRESH, FILLED].iter().position(|l| *l == r.image);
        (img, r.subject != "kiln")
    });

    println!(
        "virtio-blk, probe guest, {DISK_MIB} MiB disk: sequential = the whole disk in \
         {SEQ_KB} KiB requests; random = {count} requests of {RAND_KB} KiB at random \
         {RAND_KB} KiB-aligned offsets; up to 16 requests in flight"
    );
    println!(
        "{:13} {:14} {:>10} {:>10} {:>20} {:>20}",
        "", "", "seq write", "seq read", "rand write", "rand read"
    );
    println!(
        "{:13} {:14} {:>10} {:>10} {:>20} {:>20}",
        "subject", "image", "MB/s", "MB/s", "IOPS (MB/s)", "IOPS (MB/s)"
    );
    for r in &rows {
        let cell = |i: usize| match &r.cells[i] {
            None => "-".to_string(),
            Some(Err(_)) => "FAIL".to_string(),
            Some(Ok(b)) if i < 2 => format!("{:.0}", b.mbps()),
            Some(Ok(b)) => format!(
                "{:.0} ({:.1})",
                (b.bytes() / (RAND_KB << 10)) as f64 / b.time.as_secs_f64(),
                b.mbps()
            ),
        };
        println!(
            "{:13} {:14} {:>10} {:>10} {:>20} {:>20}",
            r.subject,
            r.image,
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        );
    }
    println!(
        "(qcow2 fresh: reads of an empty image, writes that allocate; its random writes \
         ran on a second fresh image)"
    );
    println!();
    for f in ["disk.raw", "a.qcow2", "b.qcow2"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

// ---------------------------------------------------------------------------------------
// (b) import and export through kiln serve

// The disk calls of this bench, on the shared `kiln serve` child, through the client crate.
impl Serve {
    fn client(&self) -> client::Client {
        client::Client::unix(&self.socket)
    }

    /// Streams `file` as the import body (1 MiB frames read by a thread, as `kiln disk
    /// import` does); returns the status and the answer.
    async fn import(&self, name: &str, format: &str, file: &Path) -> (u16, String) {
        let f = File::open(file).unwrap();
        let len = f.metadata().unwrap().len();
        let reply = self
            .client()
            .request(
                client::Method::POST,
                format!("/v1/disks/import?name={name}&format={format}"),
            )
            .header("content-length", &len.to_string())
            .body(
                "application/octet-stream",
                client::body::file(f, len, |_| {}),
            )
            .send()
            .await
            .unwrap();
        (reply.status.as_u16(), reply.text())
    }

    /// Streams the export into `out` (all-zero frames become holes); returns the status
    /// and the bytes received.
    async fn export(&self, name: &str, format: &str, out: &Path) -> (u16, u64) {
        let mut body = self
            .client()
            .request(
                client::Method::GET,
                format!("/v1/disks/{name}/export?format={format}"),
            )
            .stream()
            .await
            .unwrap_or_else(|e| panic!("export of {name}: {e}"));
        let status = body.status.as_u16();
        let file = File::create(out).unwrap();
        let mut pos = 0u64;
        while let Some(data) = body.chunk().await {
            let data = data.expect("export stream");
            if data.iter().any(|&b| b != 0) {
                file.write_all_at(&data, pos).unwrap();
            }
            pos += data.len() as u64;
        }
        file.set_len(pos).unwrap();
        (status, pos)
    }

    async fn delete(&self, name: &str) {
        self.client()
            .disk_delete(name)
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
}

/// A 1 GiB file of non-zero bytes (no 512-byte block of zeros anywhere).
fn make_dense(path: &Path, mib: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x2545f4914f6cdd1du64;
    for m in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x | 1).to_le_bytes());
        }
        buf[0] = m as u8 | 1;
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// A 4 GiB file with 8 MiB of data at each of 8 offsets (64 MiB in all), holes elsewhere.
fn make_sparse(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(4 << 30).unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 0x80).collect();
    for k in 0..8u64 {
        f.write_all_at(&data, k * (512 << 20) + (3 << 20)).unwrap();
    }
    f.sync_all().unwrap();
}

fn api() {
    let dir = Path::new(DIR);
    let dense = dir.join("dense-1g.raw");
    let sparse = dir.join("sparse-4g.raw");
    make_dense(&dense, 1024);
    make_sparse(&sparse);
    let serve = Serve::start(dir, Stdio::null());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = dir.join("out.img");
    println!(
        "kiln serve over its Unix socket: import (streamed body, 1 MiB frames) and export \
         (streamed into a file, zero frames as holes); MB/s of the file's length; page cache \
         not dropped (the source file is cached for every row)"
    );
    println!(
        "{:28} {:>7} {:>10} {:>12} {:>12} {:>10} {:>12}",
        "", "stored", "import", "export raw", "export qcow2", "cp", "cp + fsync"
    );
    println!(
        "{:28} {:>7} {:>10} {:>12} {:>12} {:>10} {:>12}",
        "file", "as", "MB/s", "MB/s", "MB/s", "MB/s", "MB/s"
    );
    for (label, file) in [
        ("1 GiB, non-zero data", &dense),
        ("4 GiB sparse, 64 MiB data", &sparse),
    ] {
        let len = file.metadata().unwrap().len();
        // cp of the same file, into the same directory (sparse files stay sparse).
        let cp_out = dir.join("cp.out");
        let t = Instant::now();
        run_ok("cp", &[file.to_str().unwrap(), cp_out.to_str().unwrap()]);
        let cp = t.elapsed();
        run_ok("sync", &[cp_out.to_str().unwrap()]);
        let cp_sync = t.elapsed();
        let _ = std::fs::remove_file(&cp_out);
        for fmt in ["raw", "qcow2"] {
            let name = format!("bench-{fmt}");
            let t = Instant::now();
            let (st, body) = rt.block_on(serve.import(&name, fmt, file));
            let import = t.elapsed();
            assert_eq!(st, 201, "import {label} as {fmt}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["size"].as_u64(), Some(len), "{body}");
            let mut exports = Vec::new();
            for xf in ["raw", "qcow2"] {
                let t = Instant::now();
                let (st, n) = rt.block_on(serve.export(&name, xf, &out));
                let d = t.elapsed();
                assert_eq!(st, 200, "export {name} as {xf}");
                if xf == "raw" {
                    assert_eq!(n, len, "raw export length");
                }
                exports.push(d);
                let _ = std::fs::remove_file(&out);
            }
            rt.block_on(serve.delete(&name));
            println!(
                "{:28} {:>7} {:>10.0} {:>12.0} {:>12.0} {:>10.0} {:>12.0}",
                label,
                fmt,
                mbps(len, import),
                mbps(len, exports[0]),
                mbps(len, exports[1]),
                mbps(len, cp),
                mbps(len, cp_sync)
            );
        }
    }
    println!(
        "(import includes the server's fsync of the new disk; cp is the same cp for both \
         rows of a file)"
    );
    drop(serve);
    for f in [&dense, &sparse] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(dir.join("state"));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let with_qemu = !has(&args, "--no-qemu");
    let count = arg(&args, "--count", 16384u64);
    std::fs::create_dir_all(DIR).unwrap();
    if !has(&args, "--no-blk") {
        blk(with_qemu, count);
    }
    if !has(&args, "--no-api") {
        api();
    }
    let _ = std::io::stdout().flush();
    let _ = std::fs::remove_dir(DIR);
}
