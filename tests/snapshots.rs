//! Instance snapshots on real KVM with the probe guest: it counts on after a restore in a new
//! process, its disk and NIC work after a restore, clones of one snapshot diverge without
//! seeing each other's memory or disk, a running disk's snapshot is crash-consistent, and
//! corrupt, truncated and foreign snapshots are refused with nothing created.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;
use images::DiskBackend;
use vmm::{
    Console, DiskConfig, DiskSnapshot, Exit, Host, KernelImage, RestoreOptions, Snapshot, Vm,
    VmConfig, VmHandle,
};

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// A `kiln` child whose guest output is read line by line.
struct Kiln {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Kiln {
    fn spawn(mut cmd: Command, args: &[&str]) -> Self {
        require_kvm();
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l.trim_end_matches('\r').to_string());
            }
        });
        Kiln {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.starts_with(prefix);
                    self.log.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the exit; returns the status, the rest of the output and stderr.
    fn finish(mut self, limit: Duration) -> (Option<i32>, Vec<String>, String) {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.log.push(l);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, self.log, err)
    }
}

/// `PROBE-COUNT n` values of whole lines.
fn counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("PROBE-COUNT ")?.parse().ok())
        .collect()
}

/// Boots the probe with `cmds` and `extra` arguments, and snapshots it into `dir` with
/// SIGUSR2 (snapshot, then stop) once a line starting with `when` appears. Returns the output.
fn snapshot_at(cmd: Command, cmds: &str, extra: &[&str], when: &str, dir: &Path) -> Vec<String> {
    let cmdline = format!("console=ttyS0 probe={cmds}");
    let mut args = vec![
        "run",
        "--cmdline",
        &cmdline,
        "--snapshot-to",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut k = Kiln::spawn(cmd, &args);
    assert!(k.wait_for(when, Duration::from_secs(60)), "{:?}", k.log);
    k.signal(libc::SIGUSR2);
    let (status, log, err) = k.finish(Duration::from_secs(30));
    assert_eq!(status, Some(0), "{log:?}\n{err}");
    assert!(err.contains("snapshot written to"), "{err}");
    log
}

fn restore(
    cmd: Command,
    dir: &Path,
    extra: &[&str],
    limit: Duration,
) -> (Option<i32>, Vec<String>, String) {
    let mut args = vec!["run", "--restore", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let k = Kiln::spawn(cmd, &args);
    k.finish(limit)
}

fn kiln_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn the_probe_counts_on_after_a_restore_in_a_new_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let before = snapshot_at(
        kiln_cmd(),
        "smp,count:25,poweroff",
        &["--cpus", "2"],
        "PROBE-COUNT 5",
        &dir,
    );
    assert!(before.iter().any(|l| l == "PROBE-OK smp 2/2"), "{before:?}");
    let last = *counts(&before).last().unwrap();
    // Twice from the same snapshot: restoring leaves it as it was.
    for _ in 0..2 {
        let (status, after, err) = restore(kiln_cmd(), &dir, &[], Duration::from_secs(60));
        assert_eq!(status, Some(0), "{after:?}\n{err}");
        assert!(
            !after.iter().any(|l| l.starts_with("KILN-PROBE")),
            "it booted again: {after:?}"
        );
        let c = counts(&after);
        // The snapshot may have caught a line half written: its rest comes first.
        assert!(c[0] == last + 1 || c[0] == last + 2, "{last} then {c:?}");
        assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{c:?}");
        assert_eq!(*c.last().unwrap(), 25);
        assert!(after.iter().any(|l| l == "PROBE-OK poweroff"), "{after:?}");
    }
}

#[test]
fn a_vm_with_a_pit_has_it_again_after_a_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let before = snapshot_at(
        kiln_cmd(),
        "count:8,pit,poweroff",
        &["--pit"],
        "PROBE-COUNT 3",
        &dir,
    );
    assert!(
        !before.iter().any(|l| l.starts_with("PROBE-OK pit")),
        "{before:?}"
    );
    let (status, after, err) = restore(kiln_cmd(), &dir, &[], Duration::from_secs(60));
    assert_eq!(status, Some(0), "{after:?}\n{err}");
    assert!(
        after.iter().any(|l| l.starts_with("PROBE-OK pit present ")),
        "{after:?}"
    );
}

const TAP: &str = "ktap0";
const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";

#[test]
fn disk_and_nic_work_after_a_restore() {
    let ns = Netns::new("snapnet", TAP, HOST_IP);
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.qcow2");
    images::create_blank(&disk, images::Format::Qcow2, 16 << 20).unwrap();
    let dir = tmp.path().join("snap");
    let disk_arg = format!("path={}", disk.display());
    let net_arg = format!("tap={TAP},mac=02:00:00:00:00:07");
    let cmds = format!(
        "blk-write:0:0:16:3,net-ip:0:{GUEST_IP},count:30,blk-verify:0:0:16:3,\
         blk-write:0:16:16:4,blk-verify:0:16:16:4,net-info:0,net-serve:0:6,poweroff"
    );
    let before = snapshot_at(
        ns.command(env!("CARGO_BIN_EXE_kiln")),
        &cmds,
        &["--disk", &disk_arg, "--net", &net_arg],
        "PROBE-COUNT 2",
        &dir,
    );
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("PROBE-OK blk-write blk0")),
        "{before:?}"
    );
    // The snapshot's copy of the disk holds what the guest wrote, and QEMU agrees it is sound.
    let copy = dir.join("disk-0.qcow2");
    let out = Command::new("qemu-img")
        .args(["check", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut c = images::open_disk(&copy, true, &Default::default()).unwrap();
    let mut buf = vec![0u8; 16 * 512];
    c.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern_bytes(3, 0, buf.len()));

    let mut k = Kiln::spawn(
        ns.command(env!("CARGO_BIN_EXE_kiln")),
        &["run", "--restore", dir.to_str().unwrap()],
    );
    assert!(
        k.wait_for(
            "PROBE-OK blk-verify blk0 sectors=16",
            Duration::from_secs(60)
        ),
        "{:?}",
        k.log
    );
    assert!(
        k.wait_for(
            "PROBE-OK blk-verify blk0 sectors=16",
            Duration::from_secs(30)
        ),
        "{:?}",
        k.log
    );
    assert!(
        k.wait_for(
            "PROBE-OK net-info net0 mac=02:00:00:00:00:07",
            Duration::from_secs(30)
        ),
        "{:?}",
        k.log
    );
    let ping = ns
        .command("ping")
        .args(["-q", "-c", "6", "-i", "0.05", "-W", "5", GUEST_IP])
        .output()
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(
        ping_out.contains("6 packets transmitted, 6 received"),
        "{ping_out}"
    );
    let (status, log, err) = k.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "{log:?}\n{err}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("PROBE-OK net-serve net0 answered=6")),
        "{log:?}"
    );
    // The live disk has both writes; the snapshot's copy only the first.
    let mut d = images::open_disk(&disk, true, &Default::default()).unwrap();
    let mut both = vec![0u8; 32 * 512];
    d.read_at(&mut both, 0).unwrap();
    assert!(both[..8192] == pattern_bytes(3, 0, 8192)[..]);
    assert!(both[8192..] == pattern_bytes(4, 8192, 8192)[..]);
    let mut c = images::open_disk(&copy, true, &Default::default()).unwrap();
    c.read_at(&mut both, 0).unwrap();
    assert!(both[8192..].iter().all(|&b| b == 0));
}

/// A VM in this process with console input, its output in a buffer.
struct Guest {
    handle: VmHandle,
    out: Buffer,
    input: std::fs::File,
    thread: std::thread::JoinHandle<Result<Exit, vmm::VmError>>,
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds from pipe().
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

fn start(make: impl FnOnce(Console) -> Vm) -> Guest {
    require_kvm();
    let (r, w) = pipe();
    let out = Buffer::default();
    let mut vm = make(Console {
        output: Box::new(out.clone()),
        input: Some(r),
    });
    let handle = vm.handle();
    Guest {
        handle,
        out,
        input: w,
        thread: std::thread::spawn(move || vm.run()),
    }
}

fn probe_config(cmds: &str, disks: Vec<PathBuf>) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory: 64 << 20,
        kernel: KernelImage::Bytes(bytes::Bytes::from_static(PROBE)),
        initrd: None,
        cmdline: format!("console=ttyS0 probe={cmds}"),
        disks: disks
            .into_iter()
            .map(|path| DiskConfig {
                path,
                read_only: false,
                serial: String::new(),
                backing_dirs: Vec::new(),
                block_size: 512,
            })
            .collect(),
        nets: Vec::new(),
        pit: false,
    }
}

fn sha(path: &Path) -> Vec<u8> {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    out.stdout
}

#[test]
fn clones_of_one_snapshot_diverge_in_memory_and_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("base.qcow2");
    images::create_blank(&disk, images::Format::Qcow2, 4 << 20).unwrap();
    let host = Arc::new(Host::open().unwrap());
    let cmds = "blk-write:0:0:8:1,note,count:15,recall,blk-verify:0:0:8:1,blk-write:0:0:8:9,\
                blk-verify:0:0:8:9,poweroff";
    let g = start(|c| Vm::new(host.clone(), probe_config(cmds, vec![disk.clone()]), c).unwrap());
    assert!(
        g.out
            .wait_for("PROBE-OK note ready", Duration::from_secs(30)),
        "{}",
        g.out.text()
    );
    let dir = tmp.path().join("snap");
    let report = g.handle.snapshot(&dir).unwrap();
    assert!(
        report.memory_written < report.memory_total / 4,
        "{report:?}"
    );
    g.handle.stop();
    assert_eq!(g.thread.join().unwrap().unwrap(), Exit::Stopped);
    let memory_before = sha(&dir.join("memory"));

    let snap = Arc::new(Snapshot::load(&dir).unwrap());
    let (base, format) = snap.disk_copy(0).unwrap();
    assert_eq!(format, images::Format::Qcow2);
    let clone = |name: &str| {
        let overlay = tmp.path().join(format!("{name}.qcow2"));
        let opts = images::OpenOptions {
            allowed_dirs: vec![dir.clone()],
            ..Default::default()
        };
        images::create_overlay(&overlay, &base, None, &opts).unwrap();
        let options = RestoreOptions {
            disks: vec![Some(overlay.clone())],
            nets: Vec::new(),
        };
        let (host, snap) = (host.clone(), snap.clone());
        let g = start(move |c| Vm::restore(host, snap, &options, c).unwrap());
        (overlay, g)
    };
    let (overlay_a, mut a) = clone("a");
    let (overlay_b, mut b) = clone("b");
    a.input.write_all(b"alpha\n").unwrap();
    assert!(
        a.out
            .wait_for("PROBE-OK note alpha", Duration::from_secs(30)),
        "{}",
        a.out.text()
    );
    b.input.write_all(b"beta\n").unwrap();
    assert!(
        b.out
            .wait_for("PROBE-OK note beta", Duration::from_secs(30)),
        "{}",
        b.out.text()
    );
    // A recalls after B noted: each sees its own memory.
    for (g, want) in [(&a, "alpha"), (&b, "beta")] {
        assert!(
            g.out.wait_for("PROBE-OK poweroff", Duration::from_secs(60)),
            "{}",
            g.out.text()
        );
        let text = g.out.text();
        assert!(
            text.contains(&format!("PROBE-OK recall {want}\r\n")),
            "{text}"
        );
        // Each saw the disk as snapshotted, not the other's write.
        assert_eq!(
            text.matches("PROBE-OK blk-verify blk0 sectors=8").count(),
            2,
            "{text}"
        );
        assert!(!text.contains("KILN-PROBE"), "{text}");
    }
    assert_eq!(a.thread.join().unwrap().unwrap(), Exit::PowerOff);
    assert_eq!(b.thread.join().unwrap().unwrap(), Exit::PowerOff);
    // Their writes are in their own disks; the snapshot is unchanged.
    for o in [&overlay_a, &overlay_b] {
        let mut d = images::open_disk(
            o,
            true,
            &images::OpenOptions {
                allowed_dirs: vec![dir.clone()],
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf == pattern_bytes(9, 0, 4096));
    }
    let mut d = images::open_disk(&base, true, &Default::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern_bytes(1, 0, 4096));
    assert_eq!(sha(&dir.join("memory")), memory_before);
}

/// The length of the longest prefix of `got` that is the probe's pattern `seed`.
fn pattern_prefix(got: &[u8], seed: u8) -> usize {
    got.iter()
        .enumerate()
        .take_while(|(o, b)| **b == pattern(seed, *o as u64))
        .count()
}

#[test]
fn a_running_disk_snapshot_is_crash_consistent() {
    // The guest writes 1 MiB front to back (about 2 s on PVM) while snapshots are taken: each must hold the
    // pattern up to a request boundary and the old content (zeros) after it, never a torn
    // request, and later snapshots hold at least as much.
    let tmp = tempfile::tempdir().unwrap();
    for (name, format) in [
        ("q.qcow2", images::Format::Qcow2),
        ("r.raw", images::Format::Raw),
    ] {
        let disk = tmp.path().join(name);
        images::create_blank(&disk, format, 4 << 20).unwrap();
        let host = Arc::new(Host::open().unwrap());
        let g = start(|c| {
            Vm::new(
                host.clone(),
                probe_config("blk-write:0:0:2048:5,note,poweroff", vec![disk.clone()]),
                c,
            )
            .unwrap()
        });
        let mut taken = Vec::new();
        for i in 0..6 {
            std::thread::sleep(Duration::from_millis(100));
            let to = match format {
                images::Format::Qcow2 => DiskSnapshot::Internal(format!("s{i}")),
                images::Format::Raw => DiskSnapshot::File(tmp.path().join(format!("r{i}.snap"))),
            };
            g.handle.snapshot_disk(0, &to).unwrap();
            taken.push(to);
        }
        assert!(
            g.out
                .wait_for("PROBE-OK note ready", Duration::from_secs(120)),
            "{}",
            g.out.text()
        );
        assert!(g
            .out
            .text()
            .contains("PROBE-OK blk-write blk0 sectors=2048"));
        let mut input = g.input;
        input.write_all(b"done\n").unwrap();
        assert_eq!(g.thread.join().unwrap().unwrap(), Exit::PowerOff);
        let mut last = 0;
        let mut prefixes = Vec::new();
        for to in &taken {
            let mut d: Box<dyn DiskBackend> = match to {
                DiskSnapshot::Internal(n) => Box::new(
                    images::Qcow2Disk::open_snapshot(&disk, n, &Default::default()).unwrap(),
                ),
                DiskSnapshot::File(p) => images::open_disk(p, true, &Default::default()).unwrap(),
            };
            let mut got = vec![0u8; 4 << 20];
            d.read_at(&mut got, 0).unwrap();
            let n = pattern_prefix(&got, 5);
            assert_eq!(n % 512, 0, "{to:?}: a torn sector at {n}");
            assert!(
                got[n..].iter().all(|&b| b == 0),
                "{to:?}: data past the prefix {n}"
            );
            assert!(n >= last, "{to:?}: {n} < {last}");
            last = n;
            prefixes.push(n);
        }
        eprintln!("{name}: snapshot prefixes {prefixes:?}");
        if format == images::Format::Qcow2 {
            let out = Command::new("qemu-img")
                .args(["check", disk.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let l = Command::new("qemu-img")
                .args(["snapshot", "-l", disk.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&l.stdout).contains("s5"));
        }
    }
}

/// Every file under `dir` with its length.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path(), e.metadata().unwrap().len())
        })
        .collect();
    v.sort();
    v
}

/// Something done to a copy of a good snapshot.
type Damage = Box<dyn Fn(&Path)>;

#[test]
fn corrupt_truncated_and_foreign_snapshots_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    snapshot_at(kiln_cmd(), "count:1000", &[], "PROBE-COUNT 1", &good);
    let state = std::fs::read(good.join("state")).unwrap();
    let n = u16::from_le_bytes([state[12], state[13]]) as usize;
    let body = 26 + n;
    let cases: Vec<(&str, &str, Damage)> = vec![
        (
            "flipped body byte",
            "checksum",
            Box::new(move |d| {
                let mut s = std::fs::read(d.join("state")).unwrap();
                s[body + 100] ^= 1;
                std::fs::write(d.join("state"), s).unwrap();
            }),
        ),
        (
            "truncated state",
            "truncated",
            Box::new(move |d| {
                let s = std::fs::read(d.join("state")).unwrap();
                std::fs::write(d.join("state"), &s[..s.len() - 1000]).unwrap();
            }),
        ),
        (
            "truncated memory",
            "bytes where the state says",
            Box::new(|d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
            }),
        ),
        (
            "format version 3",
            "format version 3",
            Box::new(|d| {
                let mut s = std::fs::read(d.join("state")).unwrap();
                s[8] = 3;
                std::fs::write(d.join("state"), s).unwrap();
            }),
        ),
        (
            "another Kiln",
            "was written by Kiln",
            Box::new(|d| {
                let mut s = std::fs::read(d.join("state")).unwrap();
                s[14] = b'7';
                std::fs::write(d.join("state"), s).unwrap();
            }),
        ),
        (
            "not a snapshot",
            "not a Kiln snapshot",
            Box::new(|d| {
                std::fs::write(d.join("state"), b"hello").unwrap();
            }),
        ),
        (
            "no memory file",
            "memory",
            Box::new(|d| {
                std::fs::remove_file(d.join("memory")).unwrap();
            }),
        ),
    ];
    for (i, (what, says, damage)) in cases.iter().enumerate() {
        let d = tmp.path().join(format!("bad{i}"));
        let st = Command::new("cp")
            .args(["-a"])
            .arg(&good)
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success());
        damage(&d);
        let before = listing(&d);
        let (status, out, err) = restore(kiln_cmd(), &d, &[], Duration::from_secs(30));
        assert_eq!(status, Some(2), "{what}: {out:?}\n{err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(out.is_empty(), "{what}: the guest ran: {out:?}");
        assert_eq!(listing(&d), before, "{what}: files changed");
        assert!(Snapshot::load(&d).is_err(), "{what}");
    }
    // And the good one still restores.
    let (status, out, err) = restore(kiln_cmd(), &good, &[], Duration::from_secs(5));
    assert!(status.is_none() || status == Some(0), "{out:?}\n{err}");
    assert!(!counts(&out).is_empty(), "{out:?}\n{err}");
}

#[test]
fn a_snapshot_never_overwrites_and_leaves_nothing_when_it_fails() {
    let host = Arc::new(Host::open().unwrap());
    let g = start(|c| Vm::new(host, probe_config("count", vec![]), c).unwrap());
    assert!(g.out.wait_for("PROBE-COUNT 1", Duration::from_secs(30)));
    let tmp = tempfile::tempdir().unwrap();
    let existing = tmp.path().join("taken");
    std::fs::create_dir(&existing).unwrap();
    let e = g.handle.snapshot(&existing).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    let missing_parent = tmp.path().join("no/such/dir");
    assert!(g.handle.snapshot(&missing_parent).is_err());
    assert!(!tmp.path().join("no").exists());
    // The guest was not left paused.
    let n = g.out.text().matches("PROBE-COUNT").count();
    assert!(g
        .out
        .wait_for(&format!("PROBE-COUNT {}", n + 2), Duration::from_secs(30)));
    g.handle.stop();
    assert_eq!(g.thread.join().unwrap().unwrap(), Exit::Stopped);
}

#[test]
fn a_hostile_state_with_a_valid_checksum_never_crashes_kiln() {
    // Bytes of the state changed and the checksum made to match (as someone crafting a
    // snapshot would): each is refused, or restores a VM that runs or fails; Kiln goes on.
    let tmp = tempfile::tempdir().unwrap();
    let host = Arc::new(Host::open().unwrap());
    let g = start(|c| Vm::new(host.clone(), probe_config("smp,count", vec![]), c).unwrap());
    assert!(g.out.wait_for("PROBE-COUNT 1", Duration::from_secs(30)));
    let good = tmp.path().join("good");
    g.handle.snapshot(&good).unwrap();
    g.handle.stop();
    g.thread.join().unwrap().unwrap();
    let state = std::fs::read(good.join("state")).unwrap();
    let n = u16::from_le_bytes([state[12], state[13]]) as usize;
    let body = 26 + n;
    // The embedded probe image is most of the state; its bytes matter only at a reboot.
    let image = state.windows(64).position(|w| w == &PROBE[..64]).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut refused, mut ran) = (0, 0);
    for i in 0..60 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut s = state.clone();
        // Mostly the machine state after the image; every fifth the configuration before it.
        let after = image + PROBE.len();
        let at = if i % 5 == 0 {
            body + x as usize % (image - body)
        } else {
            after + x as usize % (s.len() - after)
        };
        s[at] ^= 1 << (x >> 61);
        let crc = crc32fast::hash(&s[body..]);
        s[22 + n..26 + n].copy_from_slice(&crc.to_le_bytes());
        let d = tmp.path().join(format!("h{i}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::hard_link(good.join("memory"), d.join("memory")).unwrap();
        std::fs::write(d.join("state"), &s).unwrap();
        let snap = match Snapshot::load(&d) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("byte {at}: {e}");
                refused += 1;
                continue;
            }
        };
        let r = start(|c| {
            Vm::restore(host.clone(), Arc::new(snap), &RestoreOptions::default(), c).unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        r.handle.stop();
        // Ended: stopped, powered off, or failed with a reason; never a panic.
        let _ = r.thread.join().expect("the VM thread panicked");
        ran += 1;
    }
    eprintln!("hostile states: {refused} refused at load, {ran} restored and ended");
}
