//! virtio-blk proven from inside the probe guest: real KVM, real image files.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn image(dir: &Path, name: &str, size: usize, seed: Option<u8>) -> PathBuf {
    let p = dir.join(name);
    match seed {
        Some(s) => std::fs::write(&p, pattern_bytes(s, 0, size)).unwrap(),
        None => std::fs::File::create(&p)
            .unwrap()
            .set_len(size as u64)
            .unwrap(),
    }
    p
}

fn disk_arg(path: &Path, extra: &str) -> Vec<String> {
    vec!["--disk".into(), format!("path={}{extra}", path.display())]
}

#[test]
fn two_disks_capacity_read_pattern_and_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 4 << 20, Some(0x11));
    let b = image(dir.path(), "b.raw", 8 << 20, None);
    let mut args = disk_arg(&a, ",serial=disk-a");
    args.extend(disk_arg(&b, ""));
    let r = probe_args(
        "blk-info:0,blk-info:1,blk-verify:0:0:8192:17,blk-id:0,blk-write:1:100:300:5,poweroff",
        &args,
    );
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(
        r.lines()
            .iter()
            .any(|l| l.starts_with("PROBE-OK blk-info blk0 capacity=8192 ")),
        "{}",
        r.dump()
    );
    assert!(
        r.lines()
            .iter()
            .any(|l| l.starts_with("PROBE-OK blk-info blk1 capacity=16384 ")),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-OK blk-verify blk0 sectors=8192"),
        "{}",
        r.dump()
    );
    assert!(r.has_line("PROBE-OK blk-id blk0 disk-a"), "{}", r.dump());
    assert!(
        r.has_line("PROBE-OK blk-write blk1 sectors=300"),
        "{}",
        r.dump()
    );
    let file = std::fs::read(&b).unwrap();
    let start = 100 * 512;
    assert_eq!(
        &file[start..start + 300 * 512],
        &pattern_bytes(5, start as u64, 300 * 512)[..]
    );
    assert!(file[..start].iter().all(|&x| x == 0));
    assert!(file[start + 300 * 512..].iter().all(|&x| x == 0));
}

#[test]
fn flushed_writes_are_in_the_file_while_the_vm_runs() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = image(dir.path(), "d.raw", 1 << 20, None);
    let cmdline = "console=ttyS0 probe=blk-write:0:8:16:9,blk-flush:0,hlt";
    let disk = format!("path={}", d.display());
    let mut checked = false;
    let r = run_until_then(
        kiln(),
        &["run", "--disk", &disk, "--cmdline", cmdline],
        &["PROBE-OK blk-flush blk0"],
        Duration::from_secs(60),
        || {
            let file = std::fs::read(&d).unwrap();
            assert_eq!(&file[4096..4096 + 8192], &pattern_bytes(9, 4096, 8192)[..]);
            checked = true;
        },
    );
    assert!(checked, "{}", r.dump());
}

#[test]
fn read_only_disk_refuses_writes_and_stays_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = image(dir.path(), "ro.raw", 1 << 20, Some(3));
    let before = std::fs::read(&d).unwrap();
    let r = probe_args(
        "blk-info:0,blk-write:0:0:8:1,blk-bad:0:ro-write,blk-verify:0:0:2048:3,poweroff",
        &disk_arg(&d, ",readonly=on"),
    );
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(
        r.lines()
            .iter()
            .any(|l| l.starts_with("PROBE-OK blk-info blk0 ") && l.contains(" ro=1")),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-FAIL blk-write blk0 status=1"),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-OK blk-bad blk0 ro-write status=1"),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-OK blk-verify blk0 sectors=2048"),
        "{}",
        r.dump()
    );
    assert_eq!(std::fs::read(&d).unwrap(), before);
}

#[test]
fn discard_punches_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let d = image(dir.path(), "hole.raw", 4 << 20, Some(7));
    let blocks_before = std::fs::metadata(&d).unwrap().blocks();
    let r = probe_args(
        "blk-discard:0:0:4096,blk-zeroes:0:6144:256,poweroff",
        &disk_arg(&d, ""),
    );
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.has_line("PROBE-OK blk-discard blk0"), "{}", r.dump());
    assert!(r.has_line("PROBE-OK blk-zeroes blk0"), "{}", r.dump());
    let blocks_after = std::fs::metadata(&d).unwrap().blocks();
    assert!(
        blocks_after * 512 <= blocks_before * 512 - (2 << 20),
        "{blocks_before} -> {blocks_after}"
    );
    let file = std::fs::read(&d).unwrap();
    assert!(file[..2 << 20].iter().all(|&x| x == 0));
    assert!(file[6144 * 512..6400 * 512].iter().all(|&x| x == 0));
    assert_eq!(
        &file[(2 << 20)..(2 << 20) + 512],
        &pattern_bytes(7, 2 << 20, 512)[..]
    );
}

#[test]
fn hostile_chains_fail_that_request_and_the_device_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = image(dir.path(), "h.raw", 1 << 20, Some(1));
    let kinds = [
        "short",
        "no-status",
        "oob",
        "wrong-dir",
        "overflow",
        "loop",
        "bad-next",
        "long",
        "bad-type",
    ];
    let mut cmds: Vec<String> = Vec::new();
    for k in kinds {
        cmds.push(format!("blk-bad:0:{k}"));
        cmds.push("blk-verify:0:0:64:1".into());
    }
    cmds.push("poweroff".into());
    let r = probe_args(&cmds.join(","), &disk_arg(&d, ""));
    assert_eq!(r.status, Some(0), "{}", r.dump());
    for k in kinds {
        let prefix = format!("PROBE-OK blk-bad blk0 {k} ");
        assert!(
            r.lines().iter().any(|l| l.starts_with(&prefix)),
            "{k}: {}",
            r.dump()
        );
    }
    assert_eq!(
        r.count("PROBE-OK blk-verify blk0 sectors=64"),
        kinds.len(),
        "{}",
        r.dump()
    );
    assert!(
        r.stderr.contains("virtio"),
        "Kiln logs what it refused: {}",
        r.dump()
    );
}
