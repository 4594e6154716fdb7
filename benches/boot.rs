//! Boot benchmark: process start → probe-guest banner and → process exit, the teardown (last
//! guest output → exit) and peak RSS, for `kiln run` (without and with a PIT) and for QEMU
//! microvm booting the same probe guest, interleaved, N runs each.
//!
//!     cargo bench --bench boot -- [--runs N] [--no-qemu] [--kiln-dist PATH]
//!                                 [--firecracker PATH] [--cloud-hypervisor PATH]
//!
//! `--firecracker PATH` and `--cloud-hypervisor PATH` add those VMMs booting the same probe
//! (1 vCPU, 256 MiB, no API, serial on stdout; see `common::peers` for how each one ends).
//!
//! `--kiln-dist PATH` adds another kiln binary (the shipped build: `cargo build --profile
//! dist`) beside the one cargo built for the bench.
//!
//! Kiln runs the embedded probe guest, which powers off. QEMU (`-M microvm,acpi=off`, as
//! GUESTS.md's reference configuration) has neither ACPI power-off nor an i8042 there, so its
//! probe triple-faults and QEMU exits through `-no-reboot`.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{arg, has, probe_elf, qemu_microvm, strings, Microvm};

const BANNER: &[u8] = common::BANNER.as_bytes();

struct Sample {
    banner: Duration,
    /// When the guest's last output arrived.
    last_output: Duration,
    exit: Duration,
    max_rss_kib: i64,
    status: i32,
}

fn one_run(cmd: &[String]) -> Sample {
    let start = Instant::now();
    let mut child = common::spawn_vmm(cmd);
    let mut out = child.stdout.take().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut banner = None;
    let mut last_output = Duration::ZERO;
    loop {
        let n = out.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        last_output = start.elapsed();
        buf.extend_from_slice(&chunk[..n]);
        if banner.is_none() && buf.windows(BANNER.len()).any(|w| w == BANNER) {
            banner = Some(start.elapsed());
        }
    }
    drop(out);
    let mut status = 0;
    // SAFETY: wait4 on our own child, with out-parameters we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let exit = start.elapsed();
    std::mem::forget(child); // already reaped
    let banner = banner.unwrap_or_else(|| {
        panic!(
            "no banner from {}: {}",
            cmd[0],
            String::from_utf8_lossy(&buf)
        )
    });
    Sample {
        banner,
        last_output,
        exit,
        max_rss_kib: usage.ru_maxrss,
        status: libc::WEXITSTATUS(status),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs", 20usize);
    let with_qemu = !has(&args, "--no-qemu");
    let dist = Some(arg(&args, "--kiln-dist", String::new())).filter(|d| !d.is_empty());
    let kiln = |bin: &str, extra: &[&str]| {
        let mut a = vec![
            bin,
            "run",
            "--cpus",
            "1",
            "--memory",
            "256MiB",
            "--cmdline",
            "console=ttyS0 probe=poweroff",
        ];
        a.extend_from_slice(extra);
        strings(&a)
    };
    let mut subjects = vec![
        ("kiln", kiln(env!("CARGO_BIN_EXE_kiln"), &[])),
        ("kiln --pit", kiln(env!("CARGO_BIN_EXE_kiln"), &["--pit"])),
    ];
    if let Some(d) = &dist {
        subjects.push(("kiln dist", kiln(d, &[])));
    }
    if with_qemu {
        subjects.push((
            "qemu-microvm",
            qemu_microvm(
                &probe_elf(),
                Microvm {
                    machine: "microvm,acpi=off",
                    smp: Some(1),
                    memory_mib: 256,
                    modern_virtio: false,
                    devices: Vec::new(),
                    append: "console=ttyS0 probe=triplefault".into(),
                },
            ),
        ));
    }
    let tmp = tempfile::tempdir().expect("temporary directory");
    for peer in common::peers::from_args(&args) {
        subjects.push((peer.name(), peer.boot_cmd(&probe_elf(), tmp.path(), 256)));
    }
    let mut results: Vec<Vec<Sample>> = subjects.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, (_, cmd)) in subjects.iter().enumerate() {
            results[i].push(one_run(cmd));
        }
    }
    println!(
        "{:16} {:>4} {:>10} {:>9} {:>12} {:>13}  exit status",
        "subject", "runs", "banner ms", "exit ms", "teardown ms", "peak RSS MiB"
    );
    for ((name, _), rs) in subjects.iter().zip(results) {
        let ms = |f: &dyn Fn(&Sample) -> Duration| {
            median(rs.iter().map(|r| f(r).as_secs_f64() * 1000.0).collect())
        };
        let rss = median(rs.iter().map(|r| r.max_rss_kib as f64 / 1024.0).collect());
        let mut codes: Vec<i32> = rs.iter().map(|r| r.status).collect();
        codes.sort();
        codes.dedup();
        println!(
            "{:16} {:>4} {:>10.1} {:>9.1} {:>12.1} {:>13.2}  {:?}",
            name,
            rs.len(),
            ms(&|r| r.banner),
            ms(&|r| r.exit),
            ms(&|r| r.exit - r.last_output),
            rss,
            codes
        );
    }
}
