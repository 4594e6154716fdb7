//! Internal qcow2 snapshots against QEMU: snapshots Kiln takes, deletes and rolls back to are
//! listed by `qemu-img snapshot -l` and pass `qemu-img check` (no errors, no leaks); each
//! reads back as the disk was; QEMU's snapshots can be written around; hostile snapshot
//! tables are refused. Raw disks are snapshotted as files.

use std::path::Path;

use images::{
    create_blank, create_from_snapshot, snapshot_raw, DiskBackend, Format, OpenOptions, Qcow2Disk,
};

mod common;
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn read_all(d: &mut dyn DiskBackend) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

fn write(d: &mut dyn DiskBackend, model: &mut [u8], off: u64, len: usize, seed: u64) {
    let data = pattern(seed, len);
    d.write_at(&data, off).unwrap();
    model[off as usize..off as usize + len].copy_from_slice(&data);
}

fn listed(img: &Path) -> String {
    let out = qemu_img(&["snapshot", "-l", s(img)]);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// The image's content at snapshot `name`, as QEMU reads it.
fn qemu_snapshot_bytes(dir: &Path, img: &Path, name: &str) -> Vec<u8> {
    let out = p(dir, &format!("qemu-{name}.raw"));
    let arg = format!("snapshot.name={name}");
    let r = qemu_img(&["convert", "-l", &arg, "-O", "raw", s(img), s(&out)]);
    assert!(r.status.success(), "{}", text(&r));
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

#[test]
fn snapshots_are_listed_checked_read_deleted_and_rolled_back_to() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "disk.qcow2");
    create_blank(&img, Format::Qcow2, SIZE).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
    write(&mut d, &mut model, 0, 3 * 65536 + 100, 1);
    write(&mut d, &mut model, 5 * MIB, 200_000, 2);
    let first = d.create_snapshot("first").unwrap();
    assert_eq!((first.id.as_str(), first.disk_size), ("1", SIZE));
    let at_first = model.clone();
    // Partial and whole clusters over shared ones, a discard and zeroes over shared ones.
    write(&mut d, &mut model, 100, 10, 3);
    write(&mut d, &mut model, 65536, 65536, 4);
    d.discard(5 * MIB, 65536).unwrap();
    model[5 * MIB as usize..5 * MIB as usize + 65536].fill(0);
    d.write_zeroes(2 * 65536, 65536).unwrap();
    model[2 * 65536..3 * 65536].fill(0);
    write(&mut d, &mut model, 7 * MIB, 4096, 5);
    assert!(
        DiskBackend::create_snapshot(&mut d, "first").is_err(),
        "names are unique"
    );
    DiskBackend::create_snapshot(&mut d, "second").unwrap();
    let at_second = model.clone();
    write(&mut d, &mut model, 0, 512, 6);
    assert_eq!(read_all(&mut d), model);
    let names: Vec<_> = d.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["first", "second"]);
    drop(d);

    assert_check(&img);
    let l = listed(&img);
    assert!(l.contains("first") && l.contains("second"), "{l}");
    assert!(qemu_snapshot_bytes(dir.path(), &img, "first") == at_first);
    assert!(qemu_snapshot_bytes(dir.path(), &img, "second") == at_second);
    let o = OpenOptions::default();
    assert!(read_all(&mut Qcow2Disk::open_snapshot(&img, "first", &o).unwrap()) == at_first);
    assert!(read_all(&mut Qcow2Disk::open_snapshot(&img, "2", &o).unwrap()) == at_second);

    // A new disk from a snapshot, in either format.
    for (name, format) in [("from.raw", Format::Raw), ("from.qcow2", Format::Qcow2)] {
        let out = p(dir.path(), name);
        create_from_snapshot(&img, "first", &out, format, &o, &mut |_| {}).unwrap();
        let mut nd = images::open_disk(&out, true, &o).unwrap();
        assert!(read_all(nd.as_mut()) == at_first);
    }
    assert!(create_from_snapshot(
        &img,
        "nope",
        &p(dir.path(), "x"),
        Format::Raw,
        &o,
        &mut |_| {}
    )
    .is_err());
    assert!(!p(dir.path(), "x").exists(), "nothing left behind");

    // Delete the first: the second and the disk are untouched, the freed space is free.
    let mut d = Qcow2Disk::open(&img, false, &o).unwrap();
    d.delete_snapshot("first").unwrap();
    assert!(read_all(&mut d) == model);
    drop(d);
    assert_check(&img);
    assert!(!listed(&img).contains("first"));
    assert!(qemu_snapshot_bytes(dir.path(), &img, "second") == at_second);

    // Roll back to the second, write, and the snapshot still holds what it held.
    let mut d = Qcow2Disk::open(&img, false, &o).unwrap();
    d.revert_to_snapshot("second").unwrap();
    assert!(read_all(&mut d) == at_second);
    let mut after = at_second.clone();
    write(&mut d, &mut after, 65536 + 7, 9000, 7);
    drop(d);
    assert_check(&img);
    assert!(qemu_snapshot_bytes(dir.path(), &img, "second") == at_second);
    let mut d = Qcow2Disk::open(&img, false, &o).unwrap();
    assert!(read_all(&mut d) == after);
    d.delete_snapshot("second").unwrap();
    assert!(d.snapshots().is_empty());
    drop(d);
    assert_check(&img);
    let r = qemu_img(&[
        "convert",
        "-O",
        "raw",
        s(&img),
        s(&p(dir.path(), "final.raw")),
    ]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(std::fs::read(p(dir.path(), "final.raw")).unwrap() == after);
}

#[test]
fn qemu_snapshots_are_kept_while_kiln_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "q.qcow2");
    let r = qemu_img(&["create", "-f", "qcow2", s(&img), "4M"]);
    assert!(r.status.success(), "{}", text(&r));
    qemu_io("qcow2", &img, "write -P 0x22 0 256k");
    let r = qemu_img(&["snapshot", "-c", "before", s(&img)]);
    assert!(r.status.success(), "{}", text(&r));
    let mut before = vec![0u8; 4 * MIB as usize];
    before[..256 << 10].fill(0x22);
    let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
    assert_eq!(d.snapshots()[0].name, "before");
    let mut model = before.clone();
    write(&mut d, &mut model, 4096, 70_000, 9);
    drop(d);
    assert_check(&img);
    assert!(qemu_snapshot_bytes(dir.path(), &img, "before") == before);
    // QEMU rolls back to it, Kiln reads the result.
    let r = qemu_img(&["snapshot", "-a", "before", s(&img)]);
    assert!(r.status.success(), "{}", text(&r));
    let mut d = Qcow2Disk::open(&img, true, &OpenOptions::default()).unwrap();
    assert!(read_all(&mut d) == before);
}

#[test]
fn hostile_snapshot_tables_are_refused_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "h.qcow2");
    create_blank(&img, Format::Qcow2, 4 * MIB).unwrap();
    let mut d = Qcow2Disk::open(&img, false, &OpenOptions::default()).unwrap();
    d.write_at(&[1; 4096], 0).unwrap();
    d.create_snapshot("s").unwrap();
    drop(d);
    let good = std::fs::read(&img).unwrap();
    let table = u64::from_be_bytes(good[64..72].try_into().unwrap()) as usize;
    // (what, where, the bytes put there)
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("too many snapshots", 60, u32::MAX.to_be_bytes().to_vec()),
        ("table past the end", 60, 1000u32.to_be_bytes().to_vec()),
        (
            "L1 past the end",
            table,
            (1u64 << 50).to_be_bytes().to_vec(),
        ),
        ("unaligned L1", table, 12345u64.to_be_bytes().to_vec()),
        ("huge L1", table + 8, u32::MAX.to_be_bytes().to_vec()),
        (
            "huge extra data",
            table + 36,
            u32::MAX.to_be_bytes().to_vec(),
        ),
        (
            "name past the end",
            table + 14,
            u16::MAX.to_be_bytes().to_vec(),
        ),
    ];
    for (what, at, v) in cases {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(&v);
        std::fs::write(&img, &b).unwrap();
        let r = Qcow2Disk::open(&img, true, &OpenOptions::default());
        assert!(r.is_err(), "{what}: accepted");
    }
    // Every byte of the table flipped in turn: refused or read, never a panic.
    for i in table..table + 64 {
        let mut b = good.clone();
        b[i] ^= 0xa5;
        std::fs::write(&img, &b).unwrap();
        if let Ok(mut d) = Qcow2Disk::open(&img, true, &OpenOptions::default()) {
            for s in d.snapshots() {
                if let Ok(mut v) = Qcow2Disk::open_snapshot(&img, &s.id, &OpenOptions::default()) {
                    let mut buf = vec![0u8; 65536];
                    let _ = v.read_at(&mut buf, 0);
                }
            }
            let _ = d.read_at(&mut [0u8; 512], 0);
        }
    }
}

#[test]
fn raw_disks_are_snapshotted_by_reflink_or_extent_copy() {
    let dir = tempfile::tempdir().unwrap();
    let raw = p(dir.path(), "d.raw");
    let data = sparse_raw(&raw, 16 * MIB, &[(0, 100_000, 1), (9 * MIB, 4096, 2)]);
    let snap = p(dir.path(), "d.snap");
    let t = std::time::Instant::now();
    let c = snapshot_raw(&raw, &snap).unwrap();
    let took = t.elapsed();
    assert!(std::fs::read(&snap).unwrap() == data);
    if !c.reflinked {
        // Only the data extents were copied (ext4 here has no reflinks).
        assert!(c.copied < 2 * MIB, "{c:?}");
    }
    eprintln!("raw snapshot of a 16 MiB disk holding ~104 KiB: {c:?} in {took:?}");
    assert!(
        snapshot_raw(&raw, &snap).is_err(),
        "the destination must be new"
    );
}
