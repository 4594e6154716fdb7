//! Layer 2: Debian's cloud kernel, entered through PVH, reports the machine Kiln built.
//! On PVM the kernel cannot finish booting; its early log is what this checks.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn debian_kernel_sees_kiln_e820_acpi_cpus_cmdline_and_initrd() {
    require_kvm();
    let cache = distro_guest(true);
    let vmlinux = cache.join("vmlinux");
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, vec![0x5a; 8192]).unwrap();
    let cmdline = "earlyprintk=serial console=ttyS0 kiln_layer2=1";
    // 512 MiB: the initrd goes at the top of RAM, page aligned.
    let ramdisk = "RAMDISK: [mem 0x1fffe000-0x1fffffff]";
    let want = [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 KILN  )",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        ramdisk,
        "Kernel command line: earlyprintk=serial console=ttyS0 kiln_layer2=1",
    ];
    let r = run_until(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512MiB",
            "--cmdline",
            cmdline,
        ],
        &want,
        Duration::from_secs(240),
    );
    for w in want {
        assert!(r.stdout.contains(w), "missing {w:?}\n{}", r.dump());
    }
    assert!(
        r.stdout.contains(&format!("Command line: {cmdline}")),
        "{}",
        r.dump()
    );
}
