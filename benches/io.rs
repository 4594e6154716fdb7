//! Probe-guest bulk I/O: virtio-blk sequential read and write of a 1 GiB raw image with
//! 256 KiB requests, and UDP frames over a TAP, for Kiln and QEMU microvm running the same
//! probe guest, plus `dd` on the host for the disk. Times are taken on the host between the
//! probe's PROBE-BENCH-START and PROBE-BENCH-END lines, and so is the CPU time the VMM's
//! threads spent in between (`/proc/PID/task/*/schedstat`): its own threads (device
//! emulation, event loops, I/O) per GiB moved and per 10 000 requests or frames, the
//! figure that guest-limited throughput hides; its vCPU threads apart (on a PVM host they
//! include the guest's emulated run).
//!
//!     cargo bench --bench io -- [--no-qemu] [--mib N]
//!
//! The network part runs both directions: TX (the guest blasts UDP at the host) and RX (the
//! host's datagrams, echoed by the guest).
//!
//! Needs root (network namespace, TAP). Traffic stays inside a namespace it creates.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, bench_run, has, mbps, probe_elf, qemu_microvm, strings, Microvm};

const NS: &str = "kiln-bench-io";
const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";
const TAP: &str = "kbtap0";

/// QEMU microvm for this bench: an RTC, virtio 1.0 devices.
fn qemu(probe: &Path, memory_mib: u32, devices: Vec<String>, append: String) -> Vec<String> {
    qemu_microvm(
        probe,
        Microvm {
            machine: "microvm,acpi=off,rtc=on",
            smp: None,
            memory_mib,
            modern_virtio: true,
            devices,
            append,
        },
    )
}

fn disk(mib: u64, with_qemu: bool, probe: &Path) {
    let img = PathBuf::from("/var/tmp/kiln-bench-disk.raw");
    // A fully written image, so that reads hit real data.
    let st = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", img.display()),
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let cmds = format!("blk-bench:0:{mib}:256:r,blk-bench:0:{mib}:256:w,poweroff");
    let kiln = vec![
        env!("CARGO_BIN_EXE_kiln").to_string(),
        "run".into(),
        "--memory".into(),
        "512MiB".into(),
        "--disk".into(),
        format!("path={}", img.display()),
        "--cmdline".into(),
        format!("console=ttyS0 probe={cmds}"),
    ];
    let mut subjects = vec![("kiln", kiln)];
    if with_qemu {
        let q = qemu(
            probe,
            512,
            strings(&[
                "-drive",
                &format!("id=d0,file={},format=raw,if=none", img.display()),
                "-device",
                "virtio-blk-device,drive=d0",
            ]),
            format!("console=ttyS0 probe={cmds}"),
        );
        subjects.push(("qemu-microvm", q));
    }
    println!("virtio-blk, {mib} MiB sequential, 256 KiB requests: MB/s; CPU ms of the VMM's own threads per GiB and per 10 000 requests; vCPU threads' CPU ms per GiB");
    println!(
        "{:14} {:>8} {:>8} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "subject",
        "read",
        "write",
        "r ms/GiB",
        "w ms/GiB",
        "r ms/10k",
        "w ms/10k",
        "r vCPU",
        "w vCPU"
    );
    for (name, cmd) in subjects {
        // One result per bench command, in order (read, write), failures included.
        let r = bench_run(&cmd, Duration::from_secs(600));
        let get = |i: usize, f: &dyn Fn(&common::Bench) -> f64| match r.get(i) {
            Some(Ok(b)) => format!("{:.0}", f(b)),
            Some(Err(_)) => "FAIL".to_string(),
            None => "-".to_string(),
        };
        let per_gib = |d: Duration, b: &common::Bench| {
            d.as_secs_f64() * 1e3 / (b.bytes() as f64 / (1u64 << 30) as f64)
        };
        let per_10k = |b: &common::Bench| {
            b.vmm_cpu.as_secs_f64() * 1e3 / (b.bytes() as f64 / (256 << 10) as f64) * 1e4
        };
        println!(
            "{name:14} {:>8} {:>8} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
            get(0, &|b| b.mbps()),
            get(1, &|b| b.mbps()),
            get(0, &|b| per_gib(b.vmm_cpu, b)),
            get(1, &|b| per_gib(b.vmm_cpu, b)),
            get(0, &per_10k),
            get(1, &per_10k),
            get(0, &|b| per_gib(b.vcpu_cpu, b)),
            get(1, &|b| per_gib(b.vcpu_cpu, b)),
        );
    }
    let dd = |args: &[&str]| {
        let t = Instant::now();
        let st = Command::new("dd")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        mbps(mib << 20, t.elapsed())
    };
    let i = format!("if={}", img.display());
    let o = format!("of={}", img.display());
    let count = format!("count={}", mib * 4);
    let r = dd(&[&i, "of=/dev/null", "bs=256K"]);
    let w = dd(&[
        "if=/dev/zero",
        &o,
        "bs=256K",
        &count,
        "conv=notrunc,fdatasync",
    ]);
    println!("{:14} {:>10.0} {:>10.0}", "dd (host)", r, w);
    let _ = std::fs::remove_file(&img);
}

/// The network subjects: `kiln run` and (with `with_qemu`) QEMU microvm inside the bench's
/// namespace, on its TAP, running the probe commands `cmds`.
fn net_subjects(with_qemu: bool, probe: &Path, cmds: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut kiln = strings(&[
        "ip",
        "netns",
        "exec",
        NS,
        env!("CARGO_BIN_EXE_kiln"),
        "run",
        "--net",
    ]);
    kiln.push(format!("tap={TAP},mac=02:00:00:00:00:02"));
    kiln.push("--cmdline".into());
    kiln.push(format!("console=ttyS0 probe={cmds}"));
    let mut subjects = vec![("kiln", kiln)];
    if with_qemu {
        let mut q = strings(&["ip", "netns", "exec", NS]);
        q.extend(qemu(
            probe,
            256,
            strings(&[
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
                "-device",
                "virtio-net-device,netdev=n0,mac=02:00:00:00:00:02",
            ]),
            format!("console=ttyS0 probe={cmds}"),
        ));
        subjects.push(("qemu-microvm", q));
    }
    subjects
}

struct Netns;

impl Netns {
    fn new() -> Self {
        let ip = |a: &[&str]| {
            assert!(
                Command::new("ip").args(a).status().unwrap().success(),
                "ip {a:?}"
            )
        };
        let _ = Command::new("ip")
            .args(["netns", "del", NS])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", NS]);
        ip(&["-n", NS, "tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&[
            "-n",
            NS,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            TAP,
        ]);
        ip(&["-n", NS, "link", "set", TAP, "up"]);
        Netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

fn net(with_qemu: bool, probe: &Path) {
    let _ns = Netns::new();
    let frames = 200_000;
    let size = 1400;
    let cmds = format!("net-ip:0:{GUEST_IP},net-blast:0:{HOST_IP}:9000:{frames}:{size},poweroff");
    let subjects = net_subjects(with_qemu, probe, &cmds);
    println!("virtio-net TX over TAP, {frames} UDP datagrams of {size} bytes; CPU ms of the VMM's own threads per GiB and per 10 000 frames, vCPU threads' per GiB");
    println!(
        "{:14} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "subject", "frames/s", "MB/s", "host got", "ms/GiB", "ms/10k", "vCPU/GiB"
    );
    for (name, cmd) in subjects {
        // The host's receiver, inside the namespace.
        let recv = std::thread::spawn(|| {
            let f = std::fs::File::open(format!("/var/run/netns/{NS}")).unwrap();
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let sock = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut n = 0u64;
            let mut buf = [0u8; 2048];
            while sock.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(200));
        let r = bench_run(&cmd, Duration::from_secs(300));
        let got = recv.join().unwrap();
        match r.first() {
            Some(Ok(b)) => {
                let gib = b.bytes() as f64 / (1u64 << 30) as f64;
                println!(
                    "{name:14} {:>12.0} {:>10.1} {:>12} {:>10.0} {:>10.1} {:>10.0}",
                    b.field("frames=") as f64 / b.time.as_secs_f64(),
                    b.mbps(),
                    got,
                    b.vmm_cpu.as_secs_f64() * 1e3 / gib,
                    b.vmm_cpu.as_secs_f64() * 1e3 / b.field("frames=").max(1) as f64 * 1e4,
                    b.vcpu_cpu.as_secs_f64() * 1e3 / gib,
                );
            }
            Some(Err(_)) => println!("{name:14} {:>12} {:>10} {:>12}", "FAIL", "FAIL", got),
            None => println!("{name:14} (no result)"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let with_qemu = !has(&args, "--no-qemu");
    let mib = arg(&args, "--mib", 1024u64);
    let probe = probe_elf();
    disk(mib, with_qemu, &probe);
    net(with_qemu, &probe);
    net_rx(with_qemu, &probe);
}

/// The RX direction: the host sends UDP datagrams to the probe's echo port (`net-serve`), at
/// most `WINDOW` unanswered at a time, and counts the echoes; each datagram crosses the VMM
/// twice (RX, then TX back). Rate and the VMM's CPU per 10 000 datagrams received, in the span
/// from the first send to the last echo.
fn net_rx(with_qemu: bool, probe: &Path) {
    use std::io::{BufRead, BufReader};
    const WINDOW: usize = 32;
    let _ns = Netns::new();
    let (count, size) = (50_000usize, 1400usize);
    let cmds = format!("net-ip:0:{GUEST_IP},net-serve:0:{count},poweroff");
    let subjects = net_subjects(with_qemu, probe, &cmds);
    println!("virtio-net RX: {count} UDP datagrams of {size} bytes echoed by the guest, {WINDOW} in flight; CPU ms of the VMM's own threads per GiB received and per 10 000 datagrams");
    println!(
        "{:14} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "subject", "echoes/s", "MB/s in", "echoed", "ms/GiB", "ms/10k"
    );
    for (name, cmd) in subjects {
        let mut child = common::spawn_vmm(&cmd);
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("PROBE-OK net-ip"));
        if !ready {
            println!("{name:14} (the guest never took its address)");
            let _ = child.kill();
            let _ = child.wait();
            continue;
        }
        // The host's side, inside the namespace.
        let host = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{NS}")).unwrap();
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            sock.connect((GUEST_IP, 7)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let msg = vec![0x5au8; size];
            let mut buf = [0u8; 2048];
            let (mut sent, mut got) = (0usize, 0usize);
            let start = Instant::now();
            let cpu0 = common::thread_cpu(pid);
            while got < count {
                while sent < count && sent - got < WINDOW {
                    sock.send(&msg).unwrap();
                    sent += 1;
                }
                if sock.recv(&mut buf).is_err() {
                    break; // lost: the rest is not coming
                }
                got += 1;
            }
            let took = start.elapsed();
            let cpu1 = common::thread_cpu(pid);
            (got, took, cpu1.0.saturating_sub(cpu0.0))
        });
        let (got, took, vmm_cpu) = host.join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let gib = (got * size) as f64 / (1u64 << 30) as f64;
        println!(
            "{name:14} {:>12.0} {:>10.1} {:>10} {:>10.0} {:>10.1}",
            got as f64 / took.as_secs_f64(),
            mbps((got * size) as u64, took),
            got,
            vmm_cpu.as_secs_f64() * 1e3 / gib.max(1e-9),
            vmm_cpu.as_secs_f64() * 1e3 / got.max(1) as f64 * 1e4,
        );
    }
}
