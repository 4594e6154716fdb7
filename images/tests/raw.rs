//! The raw backend: holes, zeros, growing, bounds.

use std::os::unix::fs::MetadataExt;

use images::{DiskBackend, Error, RawDisk};

mod common;
use common::pattern;

const MIB: u64 = 1 << 20;

#[test]
fn discard_punches_a_hole_and_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut d = RawDisk::create(&path, 4 * MIB).unwrap();
    assert_eq!(d.size(), 4 * MIB);
    assert_eq!(
        std::fs::metadata(&path).unwrap().blocks(),
        0,
        "created sparse"
    );
    let data = pattern(1, 4 * MIB as usize);
    d.write_at(&data, 0).unwrap();
    d.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    d.discard(MIB, 2 * MIB).unwrap();
    d.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(after < before, "st_blocks {before} -> {after}");
    let mut buf = vec![0xffu8; 4 * MIB as usize];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[..MIB as usize], data[..MIB as usize]);
    assert!(buf[MIB as usize..3 * MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(buf[3 * MIB as usize..], data[3 * MIB as usize..]);

    d.write_zeroes(3 * MIB + 100, 1000).unwrap();
    let mut small = vec![0xffu8; 1200];
    d.read_at(&mut small, 3 * MIB).unwrap();
    assert_eq!(small[..100], data[3 * MIB as usize..3 * MIB as usize + 100]);
    assert!(small[100..1100].iter().all(|&b| b == 0));
    assert_eq!(
        small[1100..],
        data[3 * MIB as usize + 1100..3 * MIB as usize + 1200]
    );
}

#[test]
fn grow_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut d = RawDisk::create(&path, MIB).unwrap();
    d.write_at(&[7u8; 512], MIB - 512).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        d.read_at(&mut buf, MIB - 256),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write_at(&buf, MIB),
        Err(Error::OutOfRange { .. })
    ));
    assert!(d.read_at(&mut buf, u64::MAX - 10).is_err());
    d.grow(2 * MIB).unwrap();
    assert_eq!(d.size(), 2 * MIB);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MIB);
    d.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    d.read_at(&mut buf, MIB - 512).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    let err = d.grow(MIB).unwrap_err();
    assert!(err.to_string().contains("shrink"), "{err}");
    drop(d);

    let mut ro = RawDisk::open(&path, true).unwrap();
    assert!(ro.read_only());
    assert_eq!(ro.size(), 2 * MIB);
    assert!(matches!(ro.write_at(&buf, 0), Err(Error::ReadOnly)));
    assert!(matches!(ro.discard(0, 512), Err(Error::ReadOnly)));
    assert!(
        RawDisk::create(&path, MIB).is_err(),
        "create refuses to clobber"
    );
}
