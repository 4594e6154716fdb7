//! qcow2 against QEMU: images Kiln writes pass `qemu-img check` and hold the expected bytes;
//! images QEMU writes read back byte-identical through Kiln.

use std::path::Path;

use images::qcow2::DEFAULT_CLUSTER_BITS;
use images::{detect_format, open_disk, DiskBackend, Format, OpenOptions, Qcow2Disk};

mod common;
use common::*;

const MIB: u64 = 1 << 20;

/// Reads a whole disk through Kiln.
fn read_all(d: &mut dyn DiskBackend) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// A raw source with data, zero runs and a few odd-sized pieces.
fn source(len: usize) -> Vec<u8> {
    let mut v = pattern(42, len);
    v[len / 4..len / 2].fill(0);
    v[len / 2 + 3000..len / 2 + 70000].fill(0x5a);
    v
}

/// Applies a fixed sequence of writes, discards and zeroings to a disk and a model.
fn exercise(d: &mut dyn DiskBackend, model: &mut [u8], cs: u64) {
    let size = model.len() as u64;
    let write = |d: &mut dyn DiskBackend, model: &mut [u8], off: u64, len: usize, seed| {
        let data = pattern(seed, len);
        d.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    };
    write(d, model, 0, 512, 1);
    write(d, model, 1, 3, 2);
    write(d, model, cs - 100, 300, 3);
    write(d, model, 3 * cs + 17, 5 * cs as usize, 4);
    write(d, model, size / 2, MIB as usize + 4096, 5);
    write(d, model, size - 700, 700, 6);
    d.discard(cs, 2 * cs).unwrap();
    model[cs as usize..3 * cs as usize].fill(0);
    d.write_zeroes(size / 2 + 1000, 3 * cs + 5).unwrap();
    let z = (size / 2 + 1000) as usize;
    model[z..z + 3 * cs as usize + 5].fill(0);
    write(d, model, cs + 10, 20, 7);
    d.discard(size - 3 * cs - 1, 3 * cs + 1).unwrap();
    model[(size - 3 * cs - 1) as usize..].fill(0);
    write(d, model, size - 2 * cs, 100, 8);
    d.flush().unwrap();
    assert_eq!(read_all(d), model);
}

#[test]
fn kiln_written_qcow2_passes_check_and_compare() {
    for cluster_bits in [9, 12, DEFAULT_CLUSTER_BITS] {
        let dir = tempfile::tempdir().unwrap();
        let img = p(dir.path(), "disk.qcow2");
        let size = 6 * MIB;
        Qcow2Disk::create(&img, size, cluster_bits, None).unwrap();
        assert_eq!(detect_format(&img).unwrap(), Format::Qcow2);
        assert_check(&img);
        let mut model = vec![0u8; size as usize];
        {
            let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
            assert_eq!(d.size(), size);
            exercise(&mut d, &mut model, 1 << cluster_bits);
        }
        let raw = p(dir.path(), "expected.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_check(&img);
        assert_compare(&img, &raw);
        let mut d = open_disk(&img, true, &OpenOptions::default()).unwrap();
        assert_eq!(read_all(d.as_mut()), model);
    }
}

#[test]
fn refcount_table_grows_when_the_image_fills() {
    // 512-byte clusters: one refcount table cluster covers 64 blocks * 256 clusters = 8 MiB.
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "big.qcow2");
    let size = 20 * MIB;
    Qcow2Disk::create(&img, size, 9, None).unwrap();
    let data = pattern(9, size as usize);
    {
        let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
        for (i, chunk) in data.chunks(MIB as usize).enumerate() {
            d.write_at(chunk, i as u64 * MIB).unwrap();
        }
        d.discard(5 * MIB, 3 * MIB).unwrap();
        d.write_at(&data[5 * MIB as usize..6 * MIB as usize], 5 * MIB)
            .unwrap();
    }
    let mut model = data.clone();
    model[6 * MIB as usize..8 * MIB as usize].fill(0);
    let raw = p(dir.path(), "expected.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_check(&img);
    assert_compare(&img, &raw);
}

#[test]
fn grow_moves_the_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "g.qcow2");
    // 512-byte clusters: one L1 cluster holds 64 entries of 32 KiB each = 2 MiB.
    Qcow2Disk::create(&img, MIB, 9, None).unwrap();
    let a = pattern(1, 4096);
    let b = pattern(2, 4096);
    {
        let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
        d.write_at(&a, 1000).unwrap();
        d.grow(2 * MIB).unwrap(); // fits the L1 cluster
        d.grow(8 * MIB).unwrap(); // moves it
        assert_eq!(d.size(), 8 * MIB);
        d.write_at(&b, 7 * MIB).unwrap();
        assert!(d.grow(MIB).is_err());
    }
    let mut model = vec![0u8; 8 * MIB as usize];
    model[1000..1000 + 4096].copy_from_slice(&a);
    model[7 * MIB as usize..7 * MIB as usize + 4096].copy_from_slice(&b);
    let raw = p(dir.path(), "expected.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_check(&img);
    assert_compare(&img, &raw);
    let mut d = Qcow2Disk::open(&img, true, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&mut d), model);
}

fn convert(dir: &Path, src: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let out_path = p(dir, name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.push(s(src));
    args.push(s(&out_path));
    let out = qemu_img(&args);
    assert!(out.status.success(), "convert failed: {}", text(&out));
    out_path
}

#[test]
fn qemu_made_images_read_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let src_data = source(5 * MIB as usize + 512);
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, &src_data).unwrap();
    let variants: &[(&str, &[&str])] = &[
        ("plain.qcow2", &[]),
        ("compressed.qcow2", &["-c"]),
        ("small.qcow2", &["-o", "cluster_size=4096"]),
        ("small-c.qcow2", &["-c", "-o", "cluster_size=4096"]),
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("rc1.qcow2", &["-o", "refcount_bits=1"]),
        (
            "rc64.qcow2",
            &["-c", "-o", "refcount_bits=64,cluster_size=2M"],
        ),
    ];
    for (name, extra) in variants {
        let img = convert(dir.path(), &src, name, extra);
        let mut d = Qcow2Disk::open(&img, true, &OpenOptions::default()).unwrap();
        assert_eq!(d.size(), src_data.len() as u64, "{name}");
        assert!(read_all(&mut d) == src_data, "{name} differs");
        // Unaligned reads across clusters.
        let mut buf = vec![0u8; 70001];
        d.read_at(&mut buf, 65536 - 333).unwrap();
        assert!(
            buf[..] == src_data[65536 - 333..65536 - 333 + 70001],
            "{name}"
        );
    }

    let empty = p(dir.path(), "empty.qcow2");
    assert!(qemu_img(&["create", "-f", "qcow2", s(&empty), "3M"])
        .status
        .success());
    let mut d = open_disk(&empty, true, &OpenOptions::default()).unwrap();
    assert_eq!(d.size(), 3 * MIB);
    assert!(read_all(d.as_mut()).iter().all(|&b| b == 0));
}

#[test]
fn qemu_zero_and_discarded_clusters_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = source(4 * MIB as usize);
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, &data).unwrap();
    let img = convert(dir.path(), &src, "z.qcow2", &[]);
    qemu_io("qcow2", &img, "write -z 1M 256k");
    qemu_io("qcow2", &img, "discard 2M 128k");
    data[MIB as usize..MIB as usize + 256 * 1024].fill(0);
    data[2 * MIB as usize..2 * MIB as usize + 128 * 1024].fill(0);
    let mut d = Qcow2Disk::open(&img, true, &OpenOptions::default()).unwrap();
    assert!(read_all(&mut d) == data);
}

#[test]
fn qemu_overlays_read_through_their_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let base_data = source(3 * MIB as usize);
    let base = p(dir.path(), "base.raw");
    std::fs::write(&base, &base_data).unwrap();
    let base_q = convert(dir.path(), &base, "base.qcow2", &[]);
    let base_c = convert(dir.path(), &base, "base-c.qcow2", &["-c"]);

    for (backing, fmt) in [(&base, "raw"), (&base_q, "qcow2"), (&base_c, "qcow2")] {
        let ov = p(dir.path(), "ov.qcow2");
        let _ = std::fs::remove_file(&ov);
        let name = backing.file_name().unwrap().to_str().unwrap();
        let out = qemu_img(&["create", "-f", "qcow2", "-b", name, "-F", fmt, s(&ov)]);
        assert!(out.status.success(), "{}", text(&out));
        qemu_io("qcow2", &ov, "write -P 0xab 1M 64k");
        qemu_io("qcow2", &ov, "write -P 0xcd 100k 1k");
        qemu_io("qcow2", &ov, "write -z 2M 64k");
        let mut expected = base_data.clone();
        expected[MIB as usize..MIB as usize + 65536].fill(0xab);
        expected[100 * 1024..101 * 1024].fill(0xcd);
        expected[2 * MIB as usize..2 * MIB as usize + 65536].fill(0);
        let mut d = Qcow2Disk::open(&ov, true, &opts(dir.path())).unwrap();
        assert_eq!(d.backing_file(), Some(name));
        assert!(read_all(&mut d) == expected, "overlay on {name} differs");
    }

    // An overlay holding only the differences, written by `qemu-img convert -B`.
    let mut changed = base_data.clone();
    changed[500_000..600_000].copy_from_slice(&pattern(3, 100_000));
    let changed_path = p(dir.path(), "changed.raw");
    std::fs::write(&changed_path, &changed).unwrap();
    let diff = p(dir.path(), "diff.qcow2");
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-B",
        "base.raw",
        "-F",
        "raw",
        s(&changed_path),
        s(&diff),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut d = Qcow2Disk::open(&diff, true, &opts(dir.path())).unwrap();
    assert!(read_all(&mut d) == changed);
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn kiln_overlay_writes_never_touch_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base_data = source(3 * MIB as usize);
    let base = p(dir.path(), "base.raw");
    std::fs::write(&base, &base_data).unwrap();
    let base_c = convert(
        dir.path(),
        &base,
        "base-c.qcow2",
        &["-c", "-o", "cluster_size=4096"],
    );

    for (backing, fmt, bits) in [
        (&base, Format::Raw, DEFAULT_CLUSTER_BITS),
        (&base_c, Format::Qcow2, 12),
        (&base, Format::Raw, 9),
    ] {
        let before = sha(backing);
        let ov = p(dir.path(), "ov.qcow2");
        let _ = std::fs::remove_file(&ov);
        let name = Path::new(backing.file_name().unwrap());
        // The overlay is larger than its backing file: the tail reads as zeros.
        let size = 4 * MIB;
        Qcow2Disk::create(&ov, size, bits, Some((name, fmt))).unwrap();
        let mut model = base_data.clone();
        model.resize(size as usize, 0);
        {
            let mut d = Qcow2Disk::open(&ov, false, &opts(dir.path())).unwrap();
            assert!(read_all(&mut d) == model);
            exercise(&mut d, &mut model, 1 << bits);
        }
        assert_eq!(sha(backing), before, "backing file changed");
        assert_check(&ov);
        let raw = p(dir.path(), "expected.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_compare(&ov, &raw);
        let mut d = Qcow2Disk::open(&ov, true, &opts(dir.path())).unwrap();
        assert!(read_all(&mut d) == model);
    }
}

#[test]
fn writes_to_qemu_images_keep_them_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let src_data = source(3 * MIB as usize);
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, &src_data).unwrap();
    for (bits, refcount_bits, compress) in [
        (12u32, 16, true),
        (16, 16, true),
        (9, 1, false),
        (12, 2, true),
        (9, 8, false),
        (12, 64, true),
        (12, 0, true),
    ] {
        let name = format!("c{bits}-{refcount_bits}.qcow2");
        // refcount_bits 0 here stands for a version 2 image (16-bit refcounts).
        let o = match refcount_bits {
            0 => format!("cluster_size={},compat=0.10", 1u32 << bits),
            r => format!("cluster_size={},refcount_bits={r}", 1u32 << bits),
        };
        let mut args = vec!["-o", &o];
        if compress {
            args.push("-c");
        }
        let img = convert(dir.path(), &src, &name, &args);
        let mut model = src_data.clone();
        {
            let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
            exercise(&mut d, &mut model, 1 << bits);
        }
        assert_check(&img);
        let raw = p(dir.path(), "expected.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_compare(&img, &raw);
    }
}

#[test]
fn qemu_check_is_happy_after_reopening_many_times() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "r.qcow2");
    Qcow2Disk::create(&img, 2 * MIB, 12, None).unwrap();
    let mut model = vec![0u8; 2 * MIB as usize];
    for round in 0..5u64 {
        let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
        let off = round * 300_000 + 77;
        let data = pattern(round, 200_000);
        d.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        d.discard(round * 100_000, 50_000).unwrap();
        model[round as usize * 100_000..round as usize * 100_000 + 50_000].fill(0);
        assert!(read_all(&mut d) == model);
    }
    assert_check(&img);
}

#[test]
fn version_2_overlay_writes_zeros_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let base_data = source(4 * MIB as usize);
    let base = p(dir.path(), "base.raw");
    std::fs::write(&base, &base_data).unwrap();
    let before = sha(&base);
    let ov = p(dir.path(), "v2.qcow2");
    let out = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&ov),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut model = base_data.clone();
    {
        let mut d = Qcow2Disk::open(&ov, false, &opts(dir.path())).unwrap();
        exercise(&mut d, &mut model, 4096);
    }
    assert_eq!(sha(&base), before);
    assert_check(&ov);
    let raw = p(dir.path(), "expected.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_compare(&ov, &raw);
}

#[test]
fn images_with_internal_snapshots_open_read_only_and_read_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = source(MIB as usize);
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, &data).unwrap();
    let img = convert(dir.path(), &src, "snap.qcow2", &[]);
    let out = qemu_img(&["snapshot", "-c", "before", s(&img)]);
    assert!(out.status.success(), "{}", text(&out));
    qemu_io("qcow2", &img, "write -P 0x11 0 4k");
    let mut expected = data.clone();
    expected[..4096].fill(0x11);
    let mut d = Qcow2Disk::open(&img, true, &OpenOptions::default()).unwrap();
    assert!(read_all(&mut d) == expected);
    // Writable too (qcow2_snapshots.rs writes around snapshots).
    let d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
    assert_eq!(d.snapshots()[0].name, "before");
}

#[test]
fn open_disk_detects_raw() {
    let dir = tempfile::tempdir().unwrap();
    let raw = p(dir.path(), "plain.img");
    std::fs::write(&raw, pattern(5, 8192)).unwrap();
    assert_eq!(detect_format(&raw).unwrap(), Format::Raw);
    let mut d = open_disk(&raw, false, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(d.as_mut()), pattern(5, 8192));
    assert!(!d.read_only());
}

#[test]
fn writes_reuse_the_clusters_a_discard_freed() {
    // Every other cluster of 16 MiB discarded, then 8 MiB of new data elsewhere: the new
    // clusters go into the holes, and the file does not grow.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("holes.qcow2");
    Qcow2Disk::create(&img, 32 * MIB, DEFAULT_CLUSTER_BITS, None).unwrap();
    let cs = 1u64 << DEFAULT_CLUSTER_BITS;
    let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
    d.write_at(&pattern(1, 16 * MIB as usize), 0).unwrap();
    d.flush().unwrap();
    for c in (0..16 * MIB / cs).step_by(2) {
        d.discard(c * cs, cs).unwrap();
    }
    d.flush().unwrap();
    let before = std::fs::metadata(&img).unwrap().len();
    let data = pattern(2, 8 * MIB as usize);
    d.write_at(&data, 16 * MIB).unwrap();
    d.flush().unwrap();
    let after = std::fs::metadata(&img).unwrap().len();
    assert!(
        after <= before + cs,
        "the file grew from {before} to {after} bytes"
    );
    let mut got = vec![0u8; data.len()];
    d.read_at(&mut got, 16 * MIB).unwrap();
    assert!(got == data);
    drop(d);
    let out = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
