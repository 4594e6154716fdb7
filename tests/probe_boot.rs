//! Layer 1: the probe guest booted by `kiln run` on real KVM.

mod common;

use common::*;

fn assert_clean_poweroff(r: &Run) {
    assert!(!r.timed_out, "{}", r.dump());
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.has_line("PROBE-OK poweroff"), "{}", r.dump());
}

#[test]
fn banner_acpi_and_poweroff_exits_zero() {
    let r = probe("acpi,poweroff", &[]);
    assert_clean_poweroff(&r);
    assert!(r.has_line("KILN-PROBE v1 boot=0 entry=pvh"), "{}", r.dump());
    assert!(
        r.lines()
            .iter()
            .any(|l| l.starts_with("PROBE-OK acpi rsdp=0xe0000 tables=XSDT,FACP,APIC,DSDT")),
        "{}",
        r.dump()
    );
}

#[test]
fn madt_cpu_count_matches_cpus_and_every_ap_reports() {
    for n in [1, 2] {
        let cpus = n.to_string();
        let r = probe("cpus,smp,poweroff", &["--cpus", &cpus]);
        assert_clean_poweroff(&r);
        assert!(r.has_line(&format!("PROBE-OK cpus {n}")), "{}", r.dump());
        assert!(r.has_line(&format!("PROBE-OK smp {n}/{n}")), "{}", r.dump());
        assert_eq!(r.count("PROBE-AP "), n - 1, "{}", r.dump());
        for id in 1..n {
            assert!(
                r.has_line(&format!("PROBE-AP apic={id} up")),
                "{}",
                r.dump()
            );
        }
    }
}

#[test]
fn i8042_reboot_boots_again_in_the_same_process() {
    let r = probe("0:reboot,poweroff", &[]);
    assert_clean_poweroff(&r);
    assert_eq!(r.count("KILN-PROBE v1 "), 2, "{}", r.dump());
    assert!(r.has_line("KILN-PROBE v1 boot=0 entry=pvh"), "{}", r.dump());
    assert!(r.has_line("KILN-PROBE v1 boot=1 entry=pvh"), "{}", r.dump());
    assert!(r.has_line("PROBE-OK reboot"), "{}", r.dump());
}

#[test]
fn acpi_reset_register_reboots_in_place() {
    let r = probe("0:reboot-acpi,1:reboot-acpi,poweroff", &["--cpus", "2"]);
    assert_clean_poweroff(&r);
    assert_eq!(r.count("KILN-PROBE v1 "), 3, "{}", r.dump());
    assert!(r.has_line("KILN-PROBE v1 boot=2 entry=pvh"), "{}", r.dump());
}

#[test]
fn triple_fault_reboots_in_place_and_does_not_fail_the_vm() {
    let r = probe("0:triplefault,smp,poweroff", &["--cpus", "2"]);
    assert_clean_poweroff(&r);
    assert!(r.has_line("PROBE-OK triplefault"), "{}", r.dump());
    assert_eq!(r.count("KILN-PROBE v1 "), 2, "{}", r.dump());
    // The second boot has fresh vCPUs: the AP starts again.
    assert!(r.has_line("PROBE-OK smp 2/2"), "{}", r.dump());
}

#[test]
fn linux_64bit_entry_with_zero_page() {
    let kernel = probe_linux64();
    let r = probe(
        "cmdline,e820,acpi,cpus,poweroff",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "128",
        ],
    );
    assert_clean_poweroff(&r);
    assert!(
        r.has_line("KILN-PROBE v1 boot=0 entry=linux64"),
        "{}",
        r.dump()
    );
    assert!(r.has_line("PROBE-OK cpus 2"), "{}", r.dump());
    assert!(
        r.has_line("PROBE-OK cmdline console=ttyS0 probe=cmdline,e820,acpi,cpus,poweroff"),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-E820 base=0x0 size=0x9fc00 type=1"),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-E820 base=0x100000 size=0x7f00000 type=1"),
        "{}",
        r.dump()
    );
    assert!(r.has_line("PROBE-OK e820 entries=3"), "{}", r.dump());
}

#[test]
fn pvh_memory_map_and_initrd_reach_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let data: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &data).unwrap();
    let fnv = data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    let r = probe(
        "e820,initrd,poweroff",
        &["--initrd", initrd.to_str().unwrap(), "--memory", "64MiB"],
    );
    assert_clean_poweroff(&r);
    assert!(
        r.has_line("PROBE-E820 base=0x9fc00 size=0x60400 type=2"),
        "{}",
        r.dump()
    );
    assert!(
        r.has_line("PROBE-E820 base=0x100000 size=0x3f00000 type=1"),
        "{}",
        r.dump()
    );
    let line = r
        .lines()
        .into_iter()
        .find(|l| l.starts_with("PROBE-OK initrd "))
        .unwrap_or_else(|| panic!("{}", r.dump()))
        .to_string();
    assert!(
        line.ends_with(&format!("size=50000 fnv1a=0x{fnv:08x}")),
        "{line}"
    );
    // Placed high, page aligned, inside RAM.
    let addr = u64::from_str_radix(
        line.split("addr=0x")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap(),
        16,
    )
    .unwrap();
    assert_eq!(addr % 4096, 0);
    assert!(addr + 50_000 <= 64 << 20 && addr > 32 << 20, "{line}");
}

#[test]
fn cpuid_shows_the_hypervisor_and_hides_what_pvm_cannot_run() {
    let r = probe("cpuid,poweroff", &[]);
    assert_clean_poweroff(&r);
    let line = r
        .lines()
        .into_iter()
        .find(|l| l.starts_with("PROBE-OK cpuid "))
        .unwrap_or_else(|| panic!("{}", r.dump()))
        .to_string();
    let word = |name: &str| {
        let v = line
            .split(&format!("{name}=0x"))
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        u32::from_str_radix(v, 16).unwrap()
    };
    let ecx = word("1.ecx");
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit: {line}");
    if vmm::host::is_pvm() {
        assert_eq!(ecx & (1 << 13), 0, "CMPXCHG16B hidden on PVM: {line}");
    }
}

/// Open fds of a `kiln run` once its guest printed `until` (it then halts), after `reboots`
/// in-place reboots, with a disk attached.
fn fds_after_reboots(reboots: u32, disk: &std::path::Path) -> usize {
    use std::io::BufRead;
    let mut cmds: Vec<String> = (0..reboots).map(|b| format!("{b}:reboot-acpi")).collect();
    cmds.push("blk-info:0".into());
    cmds.push("hlt".into());
    let mut child = kiln()
        .args(["run", "--cpus", "2", "--disk"])
        .arg(format!("path={}", disk.display()))
        .args([
            "--cmdline",
            &format!("console=ttyS0 probe={}", cmds.join(",")),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    for line in out.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("PROBE-OK hlt") {
            break;
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .count();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen.matches("KILN-PROBE v1").count() as u32,
        reboots + 1,
        "{seen}"
    );
    assert!(seen.contains("PROBE-OK blk-info blk0"), "{seen}");
    fds
}

#[test]
fn reboots_in_place_leave_no_fds_behind() {
    // Each boot's devices (the ACPI registers' irqfd, the disk image, a TAP) used to stay
    // alive after the boot, held by a reference cycle: one reboot, a few more fds for good.
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let none = fds_after_reboots(0, &disk);
    let many = fds_after_reboots(8, &disk);
    assert_eq!(
        none,
        many,
        "8 reboots left {} more fds",
        many as i64 - none as i64
    );
}

#[test]
fn no_pit_unless_asked_for_and_it_counts_when_it_is() {
    for (extra, want) in [
        (&[][..], "PROBE-OK pit absent "),
        (&["--pit"][..], "PROBE-OK pit present "),
    ] {
        let r = probe("pit,poweroff", extra);
        assert_clean_poweroff(&r);
        assert!(
            r.lines().iter().any(|l| l.starts_with(want)),
            "{}",
            r.dump()
        );
    }
}
