//! Property test: random writes, discards and zeroings through the qcow2 backend agree with a
//! shadow model after every step and after re-opening, and `qemu-img check` stays clean.

use images::{DiskBackend, Format, Qcow2Disk, RawDisk};
use proptest::prelude::*;

mod common;
use common::*;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
    Reopen,
}

fn range(max_len: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1..max_len).prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(300_000), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range(400_000).prop_map(|(off, len)| Op::Discard { off, len }),
        2 => range(400_000).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => Just(Op::Reopen),
    ]
}

fn check_range(d: &mut Qcow2Disk, model: &[u8], off: u64, len: u64) -> Result<(), TestCaseError> {
    let mut buf = vec![0u8; len as usize];
    d.read_at(&mut buf, off).unwrap();
    prop_assert!(
        buf[..] == model[off as usize..(off + len) as usize],
        "read at {off} of {len} differs"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn qcow2_matches_a_shadow_model(
        cluster_bits in prop_oneof![Just(9u32), Just(12u32), Just(14u32), Just(16u32)],
        with_backing in any::<bool>(),
        ops in prop::collection::vec(op(), 1..24),
        reads in prop::collection::vec(range(200_000), 24),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        let mut model = vec![0u8; SIZE as usize];
        let backing = dir.path().join("base.raw");
        if with_backing {
            // A backing file shorter than the disk.
            let base = pattern(77, SIZE as usize - 300_000);
            let mut b = RawDisk::create(&backing, base.len() as u64).unwrap();
            b.write_at(&base, 0).unwrap();
            model[..base.len()].copy_from_slice(&base);
            Qcow2Disk::create(&img, SIZE, cluster_bits, Some((std::path::Path::new("base.raw"), Format::Raw))).unwrap();
        } else {
            Qcow2Disk::create(&img, SIZE, cluster_bits, None).unwrap();
        }
        let o = opts(dir.path());
        let mut d = Qcow2Disk::open(&img, false, &o).unwrap();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Write { off, len, seed } => {
                    let data = pattern(seed, len as usize);
                    d.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    check_range(&mut d, &model, off, len)?;
                }
                Op::Discard { off, len } => {
                    d.discard(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Zero { off, len } => {
                    d.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Reopen => {
                    drop(d);
                    d = Qcow2Disk::open(&img, false, &o).unwrap();
                }
            }
            let (roff, rlen) = reads[i];
            check_range(&mut d, &model, roff, rlen)?;
        }
        check_range(&mut d, &model, 0, SIZE)?;
        drop(d);
        let backing_bytes = with_backing.then(|| std::fs::read(&backing).unwrap());
        let mut d = Qcow2Disk::open(&img, true, &o).unwrap();
        check_range(&mut d, &model, 0, SIZE)?;
        drop(d);
        if let Some(bytes) = backing_bytes {
            prop_assert!(std::fs::read(&backing).unwrap() == bytes);
        }
        let out = qemu_img(&["check", "-f", "qcow2", s(&img)]);
        prop_assert!(out.status.success(), "qemu-img check: {}", text(&out));
    }
}
