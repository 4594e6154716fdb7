//! Layer 3: full Debian guests (kernel + busybox initramfs + ext4 root) booted to their
//! marker, mounting a virtio disk and pinging over a TAP. Needs hardware virtualisation
//! (VMX/SVM); refuses to run on PVM or without KVM.
//! Run it with: cargo test --release --features full-linux --test full_linux

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn require_hardware_virtualization() {
    require_kvm();
    assert!(
        vmm::host::has_hardware_virtualization(),
        "the full-Linux suite needs a host with hardware virtualisation (vmx or svm in \
         /proc/cpuinfo, KVM not PVM); this host cannot finish booting stock Linux"
    );
}

#[test]
fn distro_guest_boots_to_its_marker_with_two_vcpus() {
    require_hardware_virtualization();
    let cache = distro_guest(false);
    let r = run_until(
        &[
            "run",
            "--kernel",
            cache.join("vmlinux").to_str().unwrap(),
            "--initrd",
            cache.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512MiB",
            "--cmdline",
            "console=ttyS0 kiln_poweroff=1",
        ],
        &["KILN-GUEST-READY"],
        Duration::from_secs(120),
    );
    assert!(!r.timed_out, "{}", r.dump());
    let ready = r
        .lines()
        .into_iter()
        .find(|l| l.starts_with("KILN-GUEST-READY"))
        .unwrap_or_else(|| panic!("{}", r.dump()))
        .to_string();
    assert!(ready.ends_with("cpus=2"), "{ready}");
}

#[test]
fn distro_guest_mounts_vda_and_pings_over_a_tap() {
    require_hardware_virtualization();
    let cache = distro_guest(false);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs.ext4");
    std::fs::copy(cache.join("rootfs.ext4"), &root).unwrap();
    let ns = format!("kiln-l3-{}", std::process::id());
    let ip = |a: &[&str]| {
        assert!(
            Command::new("ip").args(a).status().unwrap().success(),
            "ip {a:?}"
        )
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "tuntap", "add", "dev", "l3tap0", "mode", "tap"]);
    ip(&["-n", &ns, "addr", "add", "10.79.0.1/24", "dev", "l3tap0"]);
    ip(&["-n", &ns, "link", "set", "l3tap0", "up"]);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_kiln")]);
    let disk = format!("path={}", root.display());
    let r = run_until_then(
        cmd,
        &[
            "run",
            "--kernel",
            cache.join("vmlinux").to_str().unwrap(),
            "--initrd",
            cache.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512MiB",
            "--disk",
            &disk,
            "--net",
            "tap=l3tap0",
            "--cmdline",
            "console=ttyS0 kiln_disk=1 kiln_ip=10.79.0.2/24 kiln_peer=10.79.0.1 kiln_poweroff=1",
        ],
        &["KILN-GUEST-DISK", "KILN-GUEST-PING"],
        Duration::from_secs(180),
        || {},
    );
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(r.has_line("KILN-GUEST-DISK ok kiln-rootfs"), "{}", r.dump());
    assert!(r.has_line("KILN-GUEST-PING ok"), "{}", r.dump());
}
