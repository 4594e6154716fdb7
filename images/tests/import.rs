//! `images::import`: raw and qcow2 streams into raw and qcow2 disks, judged by `qemu-img`;
//! hostile streams refused with nothing left behind.

use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use images::{import, open_disk, DiskBackend, Format, OpenOptions, Qcow2Disk};

mod common;
use common::*;

const MIB: u64 = 1 << 20;

/// A mostly empty 24 MiB disk: data at the start and the end, across cluster and 1 MiB
/// boundaries, and at odd offsets.
fn sparse_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("src.raw");
    let model = sparse_raw(
        &path,
        24 * MIB,
        &[
            (0, 4096, 1),
            (3 * 65536 - 100, 200_000, 2),
            (5 * MIB + 7, 1000, 3),
            (10 * MIB - 3000, 2 * MIB as usize, 4),
            (24 * MIB - 512, 512, 5),
        ],
    );
    (path, model)
}

/// A reader that hands out at most 4097 bytes per call, and is interrupted now and then.
struct Chunky<R> {
    inner: R,
    calls: u64,
}

impl<R: Read> Read for Chunky<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(7) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "again"));
        }
        let n = buf.len().min(4097);
        self.inner.read(&mut buf[..n])
    }
}

fn import_file(
    src: &Path,
    dst: &Path,
    format: Format,
    chunky: bool,
) -> images::Result<images::ImportSummary> {
    let file = std::fs::File::open(src).unwrap();
    let mut last = 0;
    let mut progress = |n: u64| {
        assert!(n >= last, "progress went back from {last} to {n}");
        last = n;
    };
    let res = if chunky {
        let mut r = Chunky {
            inner: file,
            calls: 0,
        };
        import(&mut r, dst, format, &OpenOptions::default(), &mut progress)
    } else {
        let mut r = file;
        import(&mut r, dst, format, &OpenOptions::default(), &mut progress)
    };
    if res.is_ok() {
        assert_eq!(
            last,
            std::fs::metadata(src).unwrap().len(),
            "final progress"
        );
    }
    res
}

#[test]
fn raw_stream_into_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let (src, model) = sparse_source(dir.path());
    for chunky in [false, true] {
        let raw = dir.path().join(format!("out-{chunky}.raw"));
        let sum = import_file(&src, &raw, Format::Raw, chunky).unwrap();
        assert_eq!(sum.source_format, Format::Raw);
        assert_eq!(sum.virtual_size, 24 * MIB);
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), 24 * MIB);
        assert_compare(&src, &raw);
        assert!(
            allocated(&raw) < 4 * MIB,
            "raw import is not sparse: {} bytes allocated",
            allocated(&raw)
        );

        let q = dir.path().join(format!("out-{chunky}.qcow2"));
        let sum = import_file(&src, &q, Format::Qcow2, chunky).unwrap();
        assert_eq!(sum.virtual_size, 24 * MIB);
        assert_check(&q);
        assert_compare(&src, &q);
        let len = std::fs::metadata(&q).unwrap().len();
        assert!(
            len < 4 * MIB,
            "qcow2 import holds zero clusters: {len} bytes"
        );
        let mut d = Qcow2Disk::open(&q, true, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 24 * MIB as usize];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf == model);
    }
}

/// Compressible data, so that `qemu-img convert -c` really compresses.
fn compressible(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 100 % 251) as u8).collect()
}

#[test]
fn qcow2_streams_into_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sparse_source(dir.path());
    // Some compressible data too.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&compressible(3 * MIB as usize), 15 * MIB)
        .unwrap();
    drop(f);
    let variants: &[(&str, &[&str])] = &[
        ("plain", &[]),
        ("compressed", &["-c"]),
        ("small-clusters", &["-o", "cluster_size=4096"]),
        ("big-clusters-c", &["-c", "-o", "cluster_size=2M"]),
        ("v2", &["-o", "compat=0.10"]),
    ];
    for (name, extra) in variants {
        let q = dir.path().join(format!("{name}.qcow2"));
        qemu_convert(&src, &q, extra);
        if *name == "plain" {
            // Zero clusters (v3) read as zeros after the import.
            qemu_io("qcow2", &q, "write -z 10M 128k");
        }
        let mut expected = src.clone();
        if *name == "plain" {
            expected = dir.path().join("plain-expected.raw");
            std::fs::copy(&src, &expected).unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&expected)
                .unwrap();
            f.write_all_at(&vec![0u8; 128 << 10], 10 * MIB).unwrap();
        }
        for (format, chunky) in [(Format::Raw, false), (Format::Qcow2, true)] {
            let before = listing(dir.path());
            let out = dir.path().join(format!("{name}-out.{format}"));
            let sum = import_file(&q, &out, format, chunky)
                .unwrap_or_else(|e| panic!("{name} into {format}: {e}"));
            assert_eq!(sum.source_format, Format::Qcow2, "{name}");
            assert_eq!(sum.virtual_size, 24 * MIB, "{name}");
            assert_compare(&expected, &out);
            if format == Format::Qcow2 {
                assert_check(&out);
            } else {
                assert!(allocated(&out) < 8 * MIB, "{name}: raw result not sparse");
            }
            // The spool file is gone: only the result is new.
            let mut after = listing(dir.path());
            after.retain(|n| !before.contains(n));
            assert_eq!(after, vec![format!("{name}-out.{format}")], "{name}");
        }
    }
}

#[test]
fn a_large_stream_of_zeros_stays_small() {
    // 1 GiB of zeros and a little data, from a generator: nothing of it is allocated.
    struct Gen {
        left: u64,
    }
    impl Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = (buf.len() as u64).min(self.left) as usize;
            buf[..n].fill(0);
            if self.left == 1 << 30 && n > 0 {
                buf[0] = 1; // The first byte is data.
            }
            self.left -= n as u64;
            Ok(n)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for format in [Format::Raw, Format::Qcow2] {
        let out = dir.path().join(format!("big.{format}"));
        let sum = import(
            &mut Gen { left: 1 << 30 },
            &out,
            format,
            &OpenOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(sum.virtual_size, 1 << 30);
        assert!(allocated(&out) < MIB, "{format}: {} bytes", allocated(&out));
        let mut d = open_disk(&out, true, &OpenOptions::default()).unwrap();
        let mut b = [9u8; 2];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1, 0]);
        if format == Format::Qcow2 {
            assert_check(&out);
        }
    }
}

fn patched(bytes: &[u8], offset: usize, with: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[offset..offset + with.len()].copy_from_slice(with);
    v
}

/// Hostile streams, each with words its error must contain.
fn hostile_corpus(scratch: &Path) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let valid = scratch.join("valid.qcow2");
    Qcow2Disk::create(&valid, 4 * MIB, 16, None).unwrap();
    {
        let mut d = Qcow2Disk::open(&valid, false, &OpenOptions::default()).unwrap();
        d.write_at(&pattern(7, 100_000), 12345).unwrap();
    }
    let good = std::fs::read(&valid).unwrap();

    let with_backing = |name: &str, backing: &str| {
        let p = scratch.join(name);
        Qcow2Disk::create(&p, MIB, 16, Some((Path::new(backing), Format::Raw))).unwrap();
        std::fs::read(&p).unwrap()
    };

    // A compressed cluster whose deflate data is garbage.
    let raw = scratch.join("c.raw");
    std::fs::write(&raw, compressible(2 * MIB as usize)).unwrap();
    let cq = scratch.join("c.qcow2");
    qemu_convert(&raw, &cq, &["-c"]);
    let mut bad_z = std::fs::read(&cq).unwrap();
    let be = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be(&bad_z, 40) as usize;
    let l2 = (be(&bad_z, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be(&bad_z, l2);
    assert!(e & (1 << 62) != 0, "qemu-img did not compress");
    let zoff = (e & ((1u64 << 54) - 1)) as usize;
    bad_z[zoff..zoff + 64].fill(0x55);

    vec![
        ("empty", Vec::new(), vec!["empty"]),
        ("odd raw", pattern(1, 1000), vec!["512"]),
        ("magic only", good[..4].to_vec(), vec!["truncated header"]),
        (
            "truncated header",
            good[..50].to_vec(),
            vec!["truncated header"],
        ),
        (
            "truncated v3 header",
            good[..80].to_vec(),
            vec!["truncated header"],
        ),
        (
            "L1 past EOF",
            patched(&good, 40, &(64 * MIB).to_be_bytes()),
            vec!["L1 table", "past the end"],
        ),
        (
            "L1 size overflow",
            patched(&good, 36, &u32::MAX.to_be_bytes()),
            vec!["L1 table size overflow"],
        ),
        (
            "refcount order 7",
            patched(&good, 96, &7u32.to_be_bytes()),
            vec!["refcount_order 7"],
        ),
        (
            "cluster bits 30",
            patched(&good, 20, &30u32.to_be_bytes()),
            vec!["cluster_bits 30"],
        ),
        (
            "encrypted",
            patched(&good, 32, &1u32.to_be_bytes()),
            vec!["encryption"],
        ),
        (
            "backing ../../etc/passwd",
            with_backing("evil.qcow2", "../../etc/passwd"),
            vec!["self-contained", "../../etc/passwd"],
        ),
        (
            "backing on itself",
            with_backing("out.qcow2", "out.qcow2"),
            vec!["self-contained", "out.qcow2"],
        ),
        (
            "absolute backing",
            with_backing("abs.qcow2", "/etc/passwd"),
            vec!["self-contained"],
        ),
        ("bad compressed cluster", bad_z, vec!["compressed"]),
    ]
}

#[test]
fn hostile_streams_are_refused_and_leave_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let corpus = hostile_corpus(scratch.path());
    // Two levels below the root, so that ../../etc/passwd from the store is /etc/passwd.
    let store = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(store.path().join("keep.raw"), [7u8; 512]).unwrap();
    std::fs::write(store.path().join("passwd"), b"not this one").unwrap();
    let before = listing(store.path());
    let opts = opts(store.path());
    for (name, bytes, words) in &corpus {
        for format in [Format::Raw, Format::Qcow2] {
            for chunky in [false, true] {
                let dst = store.path().join(format!("out.{format}"));
                let res = if chunky {
                    let mut r = Chunky {
                        inner: &bytes[..],
                        calls: 0,
                    };
                    import(&mut r, &dst, format, &opts, &mut |_| {})
                } else {
                    import(&mut &bytes[..], &dst, format, &opts, &mut |_| {})
                };
                let msg = match res {
                    Ok(_) => panic!("{name} was imported into {format}"),
                    Err(e) => e.to_string(),
                };
                if !chunky {
                    eprintln!("{name} into {format}: {msg}");
                }
                for w in words {
                    assert!(msg.contains(w), "{name}: {msg:?} does not mention {w:?}");
                }
                assert!(
                    !msg.contains(".import"),
                    "{name}: the error names the spool file: {msg}"
                );
                assert_eq!(listing(store.path()), before, "{name} into {format}");
            }
        }
    }
}

#[test]
fn the_destination_must_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("there.raw");
    std::fs::write(&dst, [1u8; 512]).unwrap();
    for format in [Format::Raw, Format::Qcow2] {
        let data = vec![0u8; 4096];
        let err = import(
            &mut &data[..],
            &dst,
            format,
            &OpenOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&dst).unwrap(), [1u8; 512]);
    }
    assert_eq!(listing(dir.path()), vec!["there.raw".to_string()]);
}

#[test]
fn a_small_image_that_claims_more_data_than_the_disk_holds_is_refused() {
    // 2 MiB clusters: one L2 table maps 512 GiB. One data cluster, one L2 table whose every
    // entry points at it, and eight L1 entries that all point at that table: 4 TiB of data
    // from a file of a few MiB.
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("bomb.qcow2");
    let run = |cmd: &str, args: &[&str]| {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = img.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            p,
            "4T",
        ],
    );
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 2M", p]);
    let mut bytes = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2_entry = be64(&bytes, l1);
    let l2 = (l2_entry & 0x00ff_ffff_ffff_fe00) as usize;
    let data_entry = be64(&bytes, l2);
    for i in 1..262_144 {
        bytes[l2 + i * 8..l2 + i * 8 + 8].copy_from_slice(&data_entry.to_be_bytes());
    }
    for i in 1..8 {
        bytes[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&l2_entry.to_be_bytes());
    }
    let free = {
        let st = rustix::fs::statvfs(scratch.path()).unwrap();
        st.f_bavail * st.f_frsize
    };
    assert!(
        free < 4 << 40,
        "this test needs a file system with less than 4 TiB free"
    );
    let store = tempfile::tempdir().unwrap();
    let dst = store.path().join("out.raw");
    let err = import(
        &mut &bytes[..],
        &dst,
        Format::Raw,
        &OpenOptions::default(),
        &mut |_| {},
    )
    .expect_err("a 4 TiB claim was imported");
    assert!(err.to_string().contains("bytes are free"), "{err}");
    assert!(listing(store.path()).is_empty());
}
