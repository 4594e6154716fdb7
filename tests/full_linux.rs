//! Layer 3: full Debian guests (kernel + busybox initramfs + ext4 root) booted to their
//! marker. Needs hardware virtualisation (VMX/SVM); refuses to run on PVM or without KVM.
//! Run it with: cargo test --release --features full-linux --test full_linux

mod common;

use common::*;
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
