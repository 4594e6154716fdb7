//! Hostile images are refused at open with an error naming the problem, and never panic.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use images::{open_disk, DiskBackend, Error, Format, OpenOptions, Qcow2Disk};

mod common;
use common::*;

const MIB: u64 = 1 << 20;

/// A valid 1 MiB image with 64 KiB clusters.
fn valid(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    Qcow2Disk::create(&path, MIB, 16, None).unwrap();
    path
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Opens the image and returns the error's message, asserting that it was refused.
fn refused(path: &Path, opts: &OpenOptions) -> String {
    match Qcow2Disk::open(path, true, opts) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} does not mention {w:?}");
    }
}

#[test]
fn truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "t.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    for len in [4usize, 50, 80] {
        std::fs::write(&img, &bytes[..len]).unwrap();
        let msg = refused(&img, &OpenOptions::default());
        assert_mentions(&msg, &["truncated header"]);
    }
    // open_disk sees the magic and refuses too.
    std::fs::write(&img, &bytes[..50]).unwrap();
    assert!(open_disk(&img, true, &OpenOptions::default()).is_err());
}

#[test]
fn l1_table_past_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "l1.qcow2");
    patch(&img, 40, &(64 * MIB).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["L1 table", "past the end"],
    );
    patch(&img, 40, &(0x30001u64).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["L1 table", "aligned"],
    );
}

#[test]
fn refcount_order_7() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "rc.qcow2");
    patch(&img, 96, &7u32.to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["refcount_order 7"],
    );
}

#[test]
fn cluster_bits_30() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "cb.qcow2");
    patch(&img, 20, &30u32.to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["cluster_bits 30"],
    );
    patch(&img, 20, &8u32.to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["cluster_bits 8"]);
}

#[test]
fn l1_size_overflow_and_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "ov.qcow2");
    patch(&img, 36, &u32::MAX.to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["L1 table size overflow"],
    );
    patch(&img, 36, &1u32.to_be_bytes());
    patch(&img, 24, &(1u64 << 50).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["L1 table too small"],
    );
    patch(&img, 24, &u64::MAX.to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["virtual size"]);
}

#[test]
fn refcount_table_outside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "rt.qcow2");
    patch(&img, 48, &(1u64 << 40).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["refcount table", "past the end"],
    );
    patch(&img, 48, &(0x10200u64).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["refcount table", "aligned"],
    );
    patch(&img, 48, &(0x10000u64).to_be_bytes());
    patch(&img, 56, &u32::MAX.to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["refcount table"]);
}

#[test]
fn unsupported_features_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "f.qcow2");
    patch(&img, 72, &(1u64 << 2).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["external data file"],
    );
    patch(&img, 72, &(1u64 << 4).to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["extended L2"]);
    patch(&img, 72, &(1u64 << 9).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["unknown incompatible features 0x200"],
    );
    patch(&img, 72, &0u64.to_be_bytes());
    patch(&img, 32, &1u32.to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["encryption"]);
    patch(&img, 32, &0u32.to_be_bytes());
    patch(&img, 4, &4u32.to_be_bytes());
    assert_mentions(&refused(&img, &OpenOptions::default()), &["version 4"]);
    patch(&img, 4, &3u32.to_be_bytes());
    // Dirty: readable, not writable.
    patch(&img, 72, &1u64.to_be_bytes());
    assert!(Qcow2Disk::open(&img, true, &OpenOptions::default()).is_ok());
    let err = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap_err();
    assert_mentions(&err.to_string(), &["dirty"]);
}

#[test]
fn backing_file_outside_the_allowed_directories() {
    // Two levels below the root, so that ../../etc/passwd is /etc/passwd.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let img = dir.path().join("evil.qcow2");
    Qcow2Disk::create(
        &img,
        MIB,
        16,
        Some((Path::new("../../etc/passwd"), Format::Raw)),
    )
    .unwrap();
    let err = Qcow2Disk::open(&img, true, &opts(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Backing { .. }));
    assert_mentions(
        &err.to_string(),
        &["/etc/passwd", "outside the allowed directories"],
    );
    // Absolute names too, and no allowed directory at all.
    let img2 = dir.path().join("evil2.qcow2");
    Qcow2Disk::create(
        &img2,
        MIB,
        16,
        Some((Path::new("/etc/passwd"), Format::Raw)),
    )
    .unwrap();
    assert_mentions(
        &refused(&img2, &opts(dir.path())),
        &["outside the allowed directories"],
    );
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 4096]).unwrap();
    let ok = dir.path().join("ok.qcow2");
    Qcow2Disk::create(&ok, MIB, 16, Some((Path::new("base.raw"), Format::Raw))).unwrap();
    assert_mentions(
        &refused(&ok, &OpenOptions::default()),
        &["outside the allowed directories"],
    );
    assert!(Qcow2Disk::open(&ok, true, &opts(dir.path())).is_ok());
    // A symlink inside the directory pointing out of it is resolved and refused.
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
    let via_link = dir.path().join("link.qcow2");
    Qcow2Disk::create(&via_link, MIB, 16, Some((Path::new("link"), Format::Raw))).unwrap();
    assert_mentions(
        &refused(&via_link, &opts(dir.path())),
        &["outside the allowed directories"],
    );
    // A missing backing file.
    let missing = dir.path().join("missing.qcow2");
    Qcow2Disk::create(
        &missing,
        MIB,
        16,
        Some((Path::new("nope.raw"), Format::Raw)),
    )
    .unwrap();
    assert_mentions(
        &refused(&missing, &opts(dir.path())),
        &["nope.raw", "cannot be opened"],
    );
}

#[test]
fn backing_chain_loops_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let me = dir.path().join("self.qcow2");
    Qcow2Disk::create(&me, MIB, 16, Some((Path::new("self.qcow2"), Format::Qcow2))).unwrap();
    assert_mentions(&refused(&me, &o), &["loop in the backing chain"]);

    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    Qcow2Disk::create(&a, MIB, 16, Some((Path::new("b.qcow2"), Format::Qcow2))).unwrap();
    Qcow2Disk::create(&b, MIB, 16, Some((Path::new("./a.qcow2"), Format::Qcow2))).unwrap();
    assert_mentions(&refused(&a, &o), &["loop in the backing chain"]);
    assert_mentions(&refused(&b, &o), &["loop in the backing chain"]);

    // c -> d -> e (raw): two backing files.
    std::fs::write(dir.path().join("e.raw"), vec![1u8; 4096]).unwrap();
    let d = dir.path().join("d.qcow2");
    let c = dir.path().join("c.qcow2");
    Qcow2Disk::create(&d, MIB, 16, Some((Path::new("e.raw"), Format::Raw))).unwrap();
    Qcow2Disk::create(&c, MIB, 16, Some((Path::new("d.qcow2"), Format::Qcow2))).unwrap();
    let mut ok = Qcow2Disk::open(&c, true, &o).unwrap();
    let mut buf = [0u8; 8];
    ok.read_at(&mut buf, 4090).unwrap();
    assert_eq!(buf, [1, 1, 1, 1, 1, 1, 0, 0]);
    let shallow = OpenOptions {
        max_chain: 1,
        ..o.clone()
    };
    assert_mentions(
        &refused(&c, &shallow),
        &["backing chain deeper than the limit of 1"],
    );
    assert!(Qcow2Disk::open(&d, true, &shallow).is_ok());
}

#[test]
fn bad_metadata_tables_are_refused_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid(dir.path(), "m.qcow2");
    {
        let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
        d.write_at(&[9u8; 70000], 1000).unwrap();
    }
    // L1 table at 0x30000: an unaligned L2 pointer.
    patch(&img, 0x30000, &(0x8000_0000_0000_1200u64).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["L1 entry 0", "unaligned"],
    );
    // Refcount table at 0x10000: a corrupt entry.
    let img = valid(dir.path(), "m2.qcow2");
    patch(&img, 0x10000, &(0x20001u64).to_be_bytes());
    assert_mentions(
        &refused(&img, &OpenOptions::default()),
        &["refcount table entry 0"],
    );
}

/// Random corruption of the metadata of a small image: opening and reading may fail, but
/// must not panic or hang.
#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fuzz.qcow2");
    Qcow2Disk::create(&img, 256 * 1024, 9, None).unwrap();
    {
        let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
        d.write_at(&pattern(1, 100_000), 5000).unwrap();
    }
    let pristine = std::fs::read(&img).unwrap();
    let noise = pattern(99, 4 * 4000);
    for i in 0..1000 {
        let mut bytes = pristine.clone();
        for k in 0..4 {
            let r = &noise[(i * 4 + k) * 4 % (noise.len() - 4)..];
            let pos = (u32::from_le_bytes([r[0], r[1], r[2], 0]) as usize) % 4096.min(bytes.len());
            bytes[pos] ^= r[3] | 1;
        }
        std::fs::write(&img, &bytes).unwrap();
        if let Ok(mut d) = Qcow2Disk::open(&img, false, &OpenOptions::default()) {
            let mut buf = vec![0u8; 256 * 1024];
            let _ = d.read_at(&mut buf, 0);
            let _ = d.write_at(&[1u8; 3000], 60_000);
            let _ = d.discard(0, 20_000);
        }
    }
}
