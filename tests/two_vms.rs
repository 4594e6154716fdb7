//! Two VMs in one process (as `kiln serve` will run them): one guest sends every hostile
//! descriptor chain, the other keeps doing disk I/O, and both end cleanly.

mod common;

use std::sync::Arc;

use vmm::{Console, DiskConfig, Exit, Host, KernelImage, Vm, VmConfig};

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

use common::Buffer;

fn vm(host: &Arc<Host>, disk: &std::path::Path, cmds: &str, out: &Buffer) -> Vm {
    let config = VmConfig {
        vcpus: 1,
        memory: 64 << 20,
        kernel: KernelImage::Bytes(bytes::Bytes::from_static(PROBE)),
        initrd: None,
        cmdline: format!("console=ttyS0 probe={cmds}"),
        disks: vec![DiskConfig {
            path: disk.to_path_buf(),
            read_only: false,
            serial: String::new(),
            backing_dirs: Vec::new(),
            block_size: 512,
        }],
        nets: Vec::new(),
        pit: false,
    };
    let console = Console {
        output: Box::new(out.clone()),
        input: None,
    };
    Vm::new(host.clone(), config, console).unwrap()
}

#[test]
fn a_hostile_guest_does_not_disturb_its_neighbour() {
    common::require_kvm();
    let host = Arc::new(Host::open().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
    std::fs::write(&b, common::pattern_bytes(4, 0, 1 << 20)).unwrap();

    let hostile: Vec<String> = [
        "short",
        "no-status",
        "oob",
        "wrong-dir",
        "overflow",
        "loop",
        "bad-next",
        "long",
        "bad-type",
    ]
    .iter()
    .map(|k| format!("blk-bad:0:{k}"))
    .chain([
        "blk-write:0:0:64:2".to_string(),
        "blk-verify:0:0:64:2".to_string(),
        "poweroff".to_string(),
    ])
    .collect();
    let quiet: Vec<String> = (0..20)
        .map(|_| "blk-verify:0:0:16:4".to_string())
        .chain(["poweroff".to_string()])
        .collect();
    let (out_a, out_b) = (Buffer::default(), Buffer::default());
    let mut vm_a = vm(&host, &a, &hostile.join(","), &out_a);
    let mut vm_b = vm(&host, &b, &quiet.join(","), &out_b);
    let ta = std::thread::spawn(move || vm_a.run());
    let tb = std::thread::spawn(move || vm_b.run());
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    let text = |b: &Buffer| String::from_utf8_lossy(&b.0.lock().unwrap()).into_owned();
    let (sa, sb) = (text(&out_a), text(&out_b));
    assert_eq!(ra.unwrap(), Exit::PowerOff, "{sa}");
    assert_eq!(rb.unwrap(), Exit::PowerOff, "{sb}");
    assert_eq!(sa.matches("PROBE-OK blk-bad blk0 ").count(), 9, "{sa}");
    assert!(sa.contains("PROBE-OK blk-verify blk0 sectors=64"), "{sa}");
    assert_eq!(
        sb.matches("PROBE-OK blk-verify blk0 sectors=16").count(),
        20,
        "{sb}"
    );
}
