//! Layer 3: real Linux guests under Kiln (design/GUESTS.md). `tests/linux/run.sh` runs every
//! scenario of `tests/linux/scenarios.sh` once, directly on a host with VMX/SVM, else under KVM
//! nested inside a QEMU TCG guest (one L1 boot for all of them); each test here asserts one
//! scenario's result and shows its log when it failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

struct Outcome {
    mode: String,
    /// Scenario → (passed, the rest of its result line).
    results: HashMap<String, (bool, String)>,
    /// Scenarios run again because the nested host failed under them (why: L1 died or hung,
    /// or stopped running a guest's vCPU).
    reruns: HashMap<String, String>,
    transcript: String,
    dir: PathBuf,
}

fn outcome() -> &'static Outcome {
    static OUTCOME: OnceLock<Outcome> = OnceLock::new();
    OUTCOME.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("layer3");
        let out = Command::new(root.join("tests/linux/run.sh"))
            .current_dir(root)
            .env("KILN", env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_L3_DIR", &dir)
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => std::process::Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("cannot run tests/linux/run.sh: {e}").into_bytes(),
            },
        };
        let transcript = format!(
            "{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut results = HashMap::new();
        let mut reruns = HashMap::new();
        let mut mode = String::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(m) = line.strip_prefix("KILN-L3-MODE ") {
                mode = m.to_string();
            }
            if let Some(r) = line.strip_prefix("KILN-L1-RERUN ") {
                let (name, why) = r.split_once(' ').unwrap_or((r, ""));
                reruns.insert(name.to_string(), why.to_string());
            }
            let Some(rest) = line.strip_prefix("KILN-SCENARIO ") else {
                continue;
            };
            let mut words = rest.splitn(3, ' ');
            let (name, verdict) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let detail = words.next().unwrap_or("").to_string();
            results.insert(name.to_string(), (verdict == "ok", detail));
        }
        // No panic here: a panicking initialiser would let the next test run it all again.
        // A scenario without a result line fails on its own, with this transcript.
        if !out.status.success() {
            eprintln!("tests/linux/run.sh failed ({})", out.status);
        }
        eprintln!("layer 3 ran {}", if mode.is_empty() { "?" } else { &mode });
        Outcome {
            mode,
            results,
            reruns,
            transcript,
            dir,
        }
    })
}

/// The scenarios of `tests/linux/scenarios.sh` that a test below asserts: all of them
/// (`every_scenario_is_asserted_by_a_test`), so none runs unchecked.
const ASSERTED: &[&str] = &[
    "xsave",
    "boot-pvh-1",
    "boot-pvh-2",
    "boot-bzimage-1",
    "boot-bzimage-2",
    "distro-cloud",
    "distro-generic",
    "blk",
    "net",
    "serve-lifecycle",
    "misbehave",
    "reboot-loop",
    "snapshot",
];

/// Asserts that scenario `name` passed; its log is in the panic message when it did not.
fn scenario(name: &str) {
    assert!(ASSERTED.contains(&name), "{name} is missing from ASSERTED");
    let o = outcome();
    let log = std::fs::read_to_string(o.dir.join("logs").join(format!("{name}.log")))
        .unwrap_or_else(|e| format!("(no log: {e})"));
    if let Some(why) = o.reruns.get(name) {
        eprintln!("{name}: run again in a fresh L1 after the nested host failed ({why})");
    }
    match o.results.get(name) {
        Some((true, detail)) => eprintln!("{name} ({}): ok {detail}", o.mode),
        Some((false, reason)) => panic!(
            "layer-3 scenario {name} failed ({}): {reason}\n--- {name}.log\n{log}",
            o.mode
        ),
        None => panic!(
            "layer-3 scenario {name} never reported ({}):\n{}",
            o.mode, o.transcript
        ),
    }
}

#[test]
fn cloud_kernel_pvh_boots_with_one_vcpu() {
    scenario("boot-pvh-1");
}

#[test]
fn cloud_kernel_pvh_boots_with_two_vcpus() {
    scenario("boot-pvh-2");
}

#[test]
fn cloud_kernel_bzimage_boots_with_one_vcpu() {
    scenario("boot-bzimage-1");
}

#[test]
fn cloud_kernel_bzimage_boots_with_two_vcpus() {
    scenario("boot-bzimage-2");
}

#[test]
fn debian_root_with_systemd_boots_on_the_cloud_kernel() {
    scenario("distro-cloud");
}

#[test]
fn debian_root_with_systemd_boots_on_the_generic_kernel() {
    scenario("distro-generic");
}

#[test]
fn virtio_blk_raw_qcow2_read_only_4k_and_discard() {
    scenario("blk");
}

#[test]
fn virtio_net_ping_and_64_mib_each_way() {
    scenario("net");
}

#[test]
fn kiln_serve_lifecycle_of_a_linux_guest() {
    scenario("serve-lifecycle");
}

#[test]
fn panicking_and_triple_faulting_guests_leave_their_neighbour_alone() {
    scenario("misbehave");
}

#[test]
fn a_linux_guest_reboots_in_place_eight_times_without_a_stall() {
    scenario("reboot-loop");
}

#[test]
fn cpuid_xsave_size_follows_xcr0() {
    scenario("xsave");
}

#[test]
fn a_linux_guest_snapshot_restores_with_its_uptime_processes_and_tcp_connection() {
    scenario("snapshot");
}

/// Needs no guest: the scenario list against the tests here.
#[test]
fn every_scenario_is_asserted_by_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("sh")
        .arg(root.join("tests/linux/scenarios.sh"))
        .arg("--list")
        .output()
        .expect("sh tests/linux/scenarios.sh --list");
    assert!(out.status.success(), "scenarios.sh --list: {out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    let mut listed: Vec<&str> = listed.split_whitespace().collect();
    let mut asserted = ASSERTED.to_vec();
    listed.sort_unstable();
    asserted.sort_unstable();
    assert_eq!(listed, asserted, "scenarios.sh --list against ASSERTED");
    let source = include_str!("linux_guests.rs");
    for name in ASSERTED {
        assert!(
            source.contains(&format!("scenario(\"{name}\");")),
            "no test asserts scenario {name}"
        );
    }
}
