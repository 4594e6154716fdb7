//! The controls a VM owner has over a running VM (what `kiln serve` builds on): the ACPI power
//! button, hard reset, pause and resume, console input.

mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use vmm::{Console, Exit, Host, KernelImage, Vm, VmConfig, VmHandle};

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

use common::Buffer;
use std::io::Write;

struct Running {
    handle: VmHandle,
    out: Buffer,
    thread: std::thread::JoinHandle<Result<Exit, vmm::VmError>>,
    input: Option<std::fs::File>,
}

fn start(cmds: &str, vcpus: u8, with_input: bool) -> Running {
    common::require_kvm();
    let host = Arc::new(Host::open().unwrap());
    let (input, writer) = if with_input {
        let (r, w) = std::io::pipe().unwrap();
        (
            Some(std::fs::File::from(OwnedFd::from(r))),
            Some(std::fs::File::from(OwnedFd::from(w))),
        )
    } else {
        (None, None)
    };
    let out = Buffer::default();
    let config = VmConfig {
        vcpus,
        memory: 64 << 20,
        kernel: KernelImage::Bytes(bytes::Bytes::from_static(PROBE)),
        initrd: None,
        cmdline: format!("console=ttyS0 probe={cmds}"),
        disks: Vec::new(),
        nets: Vec::new(),
        pit: false,
    };
    let mut vm = Vm::new(
        host,
        config,
        Console {
            output: Box::new(out.clone()),
            input,
        },
    )
    .unwrap();
    let handle = vm.handle();
    let thread = std::thread::spawn(move || vm.run());
    Running {
        handle,
        out,
        thread,
        input: writer,
    }
}

#[test]
fn power_button_makes_the_guest_power_off() {
    let r = start("wait-powerbutton", 1, false);
    assert!(
        r.out
            .wait_for("PROBE-OK wait-powerbutton armed", Duration::from_secs(20)),
        "{}",
        r.out.text()
    );
    r.handle.press_power_button().unwrap();
    assert_eq!(r.thread.join().unwrap().unwrap(), Exit::PowerOff);
    assert!(
        r.out.text().contains("PROBE-OK powerbutton pressed"),
        "{}",
        r.out.text()
    );
}

#[test]
fn hard_reset_reboots_in_place() {
    let r = start("0:hlt,poweroff", 2, false);
    assert!(
        r.out.wait_for("PROBE-OK hlt", Duration::from_secs(20)),
        "{}",
        r.out.text()
    );
    r.handle.reset().unwrap();
    assert_eq!(r.thread.join().unwrap().unwrap(), Exit::PowerOff);
    let text = r.out.text();
    assert!(text.contains("KILN-PROBE v1 boot=1 "), "{text}");
    assert_eq!(r.handle.boots(), 2);
}

#[test]
fn paused_guest_does_not_run_until_resumed() {
    let mut r = start("echo,poweroff", 2, true);
    assert!(
        r.out
            .wait_for("PROBE-OK echo ready", Duration::from_secs(20)),
        "{}",
        r.out.text()
    );
    r.handle.pause(Duration::from_secs(5)).unwrap();
    assert!(r.handle.is_paused());
    let input = r.input.as_mut().unwrap();
    input.write_all(b"while paused\r").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !r.out.text().contains("PROBE-ECHO"),
        "a paused guest ran: {}",
        r.out.text()
    );
    r.handle.resume();
    assert!(
        r.out
            .wait_for("PROBE-ECHO while paused", Duration::from_secs(10)),
        "{}",
        r.out.text()
    );
    input.write_all(b"quit\r").unwrap();
    assert_eq!(r.thread.join().unwrap().unwrap(), Exit::PowerOff);
}

#[test]
fn stop_ends_a_paused_vm() {
    let r = start("hlt", 1, false);
    assert!(
        r.out.wait_for("PROBE-OK hlt", Duration::from_secs(20)),
        "{}",
        r.out.text()
    );
    r.handle.pause(Duration::from_secs(5)).unwrap();
    r.handle.stop();
    assert_eq!(r.thread.join().unwrap().unwrap(), Exit::Stopped);
}

#[test]
fn pauses_racing_resets_and_a_stop_never_hang() {
    // Each reset ends a boot (its vCPU threads are joined) while pauses kick the vCPUs of the
    // boot they find: a kick must never reach a thread that was joined, and every pause must
    // end, whether it caught a boot or the gap between two.
    let r = start("hlt", 2, false);
    assert!(
        r.out.wait_for("PROBE-OK hlt", Duration::from_secs(20)),
        "{}",
        r.out.text()
    );
    let pauser = {
        let h = r.handle.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                let _ = h.pause(Duration::from_secs(5));
                h.resume();
            }
        })
    };
    for _ in 0..20 {
        let _ = r.handle.reset();
        std::thread::sleep(Duration::from_millis(5));
    }
    pauser.join().unwrap();
    r.handle.stop();
    assert_eq!(r.thread.join().unwrap().unwrap(), Exit::Stopped);
    assert!(r.handle.boots() > 1, "the resets re-booted the guest");
}

#[test]
fn a_vm_boots_in_a_shell_of_its_size_and_refuses_others() {
    common::require_kvm();
    let host = Arc::new(Host::open().unwrap());
    let config = |memory: u64, pit: bool| VmConfig {
        vcpus: 1,
        memory,
        kernel: KernelImage::Bytes(bytes::Bytes::from_static(PROBE)),
        initrd: None,
        cmdline: "console=ttyS0 probe=e820,poweroff".into(),
        disks: Vec::new(),
        nets: Vec::new(),
        pit,
    };
    let console = |out: &Buffer| Console {
        output: Box::new(out.clone()),
        input: None,
    };
    let shell = vmm::VmShell::new(&host, 64 << 20).unwrap();
    assert_eq!(shell.memory(), 64 << 20);
    // Another size, or a PIT (shells have none): the shell comes back.
    let out = Buffer::default();
    let mut other = Vm::new(host.clone(), config(32 << 20, false), console(&out)).unwrap();
    let shell = other
        .use_shell(shell)
        .expect_err("a 64 MiB shell for a 32 MiB VM");
    let mut with_pit = Vm::new(host.clone(), config(64 << 20, true), console(&out)).unwrap();
    let shell = with_pit
        .use_shell(shell)
        .expect_err("a shell for a VM with a PIT");
    // Its own size: the guest boots in it and sees its memory.
    let mut vm = Vm::new(host, config(64 << 20, false), console(&out)).unwrap();
    assert!(vm.use_shell(shell).is_ok());
    assert!(matches!(vm.run(), Ok(Exit::PowerOff)), "{}", out.text());
    let text = out.text();
    assert!(text.contains("PROBE-OK poweroff"), "{text}");
    assert!(
        text.contains("PROBE-E820 base=0x100000 size=0x3f00000 type=1"),
        "{text}"
    );
}
