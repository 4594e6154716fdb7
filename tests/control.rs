//! The control plane over real KVM: the lifecycle of API.md, its refusals, and restarts on the
//! same state directory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{Action, ActionRequest, Error, InstanceState, Manager, NewInstance, OperationState};
use vmm::Host;

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// A manager on `dir`, with the runtime its operations run on.
struct Plane {
    m: Arc<Manager>,
    rt: tokio::runtime::Runtime,
}

impl std::ops::Deref for Plane {
    type Target = Arc<Manager>;
    fn deref(&self) -> &Arc<Manager> {
        &self.m
    }
}

fn manager(dir: &std::path::Path) -> Plane {
    common::require_kvm();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let host = Arc::new(Host::open().unwrap());
    let m = Manager::open(
        host,
        dir,
        &[],
        bytes::Bytes::from_static(PROBE),
        rt.handle().clone(),
    )
    .unwrap();
    Plane { m, rt }
}

fn probe_instance(name: &str, cmds: &str) -> NewInstance {
    NewInstance {
        name: name.into(),
        description: String::new(),
        vcpus: 1,
        memory: 64 << 20,
        kernel: "kiln-probe".into(),
        initrd: None,
        cmdline: format!("console=ttyS0 probe={cmds}"),
        disks: Vec::new(),
        nics: Vec::new(),
        auto_start: false,
        start: false,
    }
}

fn request(action: Action, force: bool) -> ActionRequest {
    ActionRequest {
        action,
        force,
        timeout: Duration::from_secs(10),
    }
}

fn act(p: &Plane, name: &str, action: Action, force: bool) -> OperationState {
    let op = p.action(name, request(action, force)).unwrap();
    p.rt.block_on(p.operations().wait(op.id, Duration::from_secs(60)))
        .unwrap()
        .state
}

fn console(m: &Manager, name: &str) -> String {
    String::from_utf8_lossy(&m.console(name).unwrap().read_from(0).1).into_owned()
}

fn wait_console(m: &Manager, name: &str, what: &str, n: usize) -> bool {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if console(m, name).matches(what).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn state(m: &Manager, name: &str) -> InstanceState {
    m.get(name).unwrap().status.state
}

#[test]
fn lifecycle_start_stop_reboot_delete() {
    let dir = tempfile::tempdir().unwrap();
    let p = manager(dir.path());
    let m = &p.m;
    let (inst, op) = m
        .create(probe_instance("web-1", "wait-powerbutton"))
        .unwrap();
    assert!(op.is_none());
    assert_eq!(inst.status.state, InstanceState::Stopped);

    assert_eq!(
        act(&p, "web-1", Action::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Running);
    assert!(m.get("web-1").unwrap().status.started_at.is_some());
    assert!(
        wait_console(m, "web-1", "PROBE-OK wait-powerbutton armed", 1),
        "{}",
        console(m, "web-1")
    );

    // Graceful stop: the guest sees the power button and powers off.
    assert_eq!(
        act(&p, "web-1", Action::Stop, false),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Stopped);
    assert!(console(m, "web-1").contains("PROBE-OK powerbutton pressed"));

    // Start again: the history keeps the first run.
    assert_eq!(
        act(&p, "web-1", Action::Start, false),
        OperationState::Succeeded
    );
    assert!(wait_console(
        m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        2
    ));
    assert_eq!(console(m, "web-1").matches("KILN-PROBE v1 ").count(), 2);

    // Hard reboot in place, then a graceful one (power button, boot again).
    assert_eq!(
        act(&p, "web-1", Action::Reboot, true),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Running);
    assert!(wait_console(
        m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        3
    ));
    assert_eq!(
        act(&p, "web-1", Action::Reboot, false),
        OperationState::Succeeded
    );
    assert!(wait_console(
        m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        4
    ));
    assert_eq!(console(m, "web-1").matches("KILN-PROBE v1 ").count(), 4);

    // Pause and resume, then refusals that fit the state.
    assert_eq!(
        act(&p, "web-1", Action::Pause, false),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Paused);
    assert_eq!(
        act(&p, "web-1", Action::Resume, false),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Running);
    let start = m.action("web-1", request(Action::Start, false));
    assert!(
        matches!(
            start,
            Err(Error::InvalidState {
                state: InstanceState::Running,
                ..
            })
        ),
        "{start:?}"
    );
    assert!(matches!(
        m.delete("web-1", false),
        Err(Error::InvalidState { .. })
    ));

    // Force stop and delete.
    assert_eq!(
        act(&p, "web-1", Action::Stop, true),
        OperationState::Succeeded
    );
    assert_eq!(state(m, "web-1"), InstanceState::Stopped);
    m.delete("web-1", false).unwrap();
    assert!(matches!(m.get("web-1"), Err(Error::NotFound { .. })));
    assert!(m.list().is_empty());
    let states: Vec<String> = m.events().since(0).into_iter().map(|e| e.state).collect();
    for s in [
        "starting",
        "running",
        "stopping",
        "stopped",
        "rebooting",
        "paused",
        "deleted",
    ] {
        assert!(states.iter().any(|x| x == s), "no {s} event in {states:?}");
    }
}

#[test]
fn two_instances_stop_independently() {
    let dir = tempfile::tempdir().unwrap();
    let p = manager(dir.path());
    let m = &p.m;
    m.create(probe_instance("a", "hlt")).unwrap();
    m.create(probe_instance("b", "wait-powerbutton")).unwrap();
    assert_eq!(
        act(&p, "a", Action::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(
        act(&p, "b", Action::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(act(&p, "a", Action::Stop, true), OperationState::Succeeded);
    assert_eq!(state(m, "a"), InstanceState::Stopped);
    assert_eq!(state(m, "b"), InstanceState::Running);
    assert!(wait_console(m, "b", "armed", 1));
    assert_eq!(act(&p, "b", Action::Stop, false), OperationState::Succeeded);
    assert_eq!(state(m, "b"), InstanceState::Stopped);
}

#[test]
fn bad_definitions_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = manager(dir.path());
    let m = &p.m;
    let field = |r: Result<_, Error>| match r {
        Err(Error::InvalidValue { field, .. }) => field,
        other => panic!("{:?}", other.map(|_| ())),
    };
    let mut s = probe_instance("ok", "hlt");
    s.vcpus = 0;
    assert_eq!(field(m.create(s)), "vcpus");
    // A size that does not parse is the API's to refuse (tests/api_instances.rs); one too
    // small for a VM is the VM's, named here.
    let mut s = probe_instance("x", "hlt");
    s.memory = 1 << 20;
    assert_eq!(field(m.create(s)), "memory");
    assert_eq!(field(m.create(probe_instance("a/b", "hlt"))), "name");
    let mut s = probe_instance("x", "hlt");
    s.kernel = "nope".into();
    assert_eq!(field(m.create(s)), "boot.kernel");
    let mut s = probe_instance("x", "hlt");
    s.nics.push(control::NewNic {
        name: None,
        host_tap: "no/slash".into(),
        mac: None,
    });
    assert_eq!(field(m.create(s)), "network_interfaces[0].host_tap");
    let mut s = probe_instance("big", "hlt");
    s.memory = 64 << 40;
    assert!(matches!(m.create(s), Err(Error::InsufficientCapacity(_))));
    let mut s = probe_instance("many", "hlt");
    s.vcpus = 1000;
    assert!(matches!(m.create(s), Err(Error::InsufficientCapacity(_))));
    m.create(probe_instance("dup", "hlt")).unwrap();
    assert!(matches!(
        m.create(probe_instance("dup", "hlt")),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        m.action("ghost", request(Action::Start, false)),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(m.list().len(), 1, "nothing half-made");
    // Unknown fields are refused by the API's parser (tests/api_instances.rs).
}

#[test]
fn definitions_survive_a_restart_and_auto_start_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = manager(dir.path());
        let m = &p.m;
        m.create(probe_instance("keep", "hlt")).unwrap();
        let mut s = probe_instance("auto", "hlt");
        s.auto_start = true;
        m.create(s).unwrap();
        assert_eq!(
            act(&p, "keep", Action::Start, false),
            OperationState::Succeeded
        );
        m.shutdown(Duration::ZERO);
    }
    let p = manager(dir.path());
    let m = &p.m;
    let mut names: Vec<String> = m.list().into_iter().map(|i| i.def.name).collect();
    names.sort();
    assert_eq!(names, ["auto", "keep"]);
    assert_eq!(state(m, "keep"), InstanceState::Stopped);
    let end = Instant::now() + Duration::from_secs(30);
    while state(m, "auto") != InstanceState::Running && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(state(m, "auto"), InstanceState::Running);
    m.shutdown(Duration::ZERO);
}

#[test]
fn console_input_to_a_guest_that_does_not_read_is_refused_not_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let p = manager(dir.path());
    let m = &p.m;
    m.create(probe_instance("deaf", "hlt")).unwrap();
    assert_eq!(
        act(&p, "deaf", Action::Start, false),
        OperationState::Succeeded
    );
    assert!(
        wait_console(m, "deaf", "PROBE-OK hlt", 1),
        "{}",
        console(m, "deaf")
    );
    assert_eq!(
        act(&p, "deaf", Action::Pause, false),
        OperationState::Succeeded
    );
    // A paused guest reads nothing: a pipe's worth of input fills up.
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = Arc::clone(m);
    std::thread::spawn(move || {
        let mut last = Ok(());
        for _ in 0..64 {
            last = m2.console_input("deaf", &[b'x'; 16 << 10]);
            if last.is_err() {
                break;
            }
        }
        let _ = tx.send(last);
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("console input hung");
    assert!(matches!(r, Err(Error::InUse(_))), "{r:?}");
    // The manager still answers, and the instance can be stopped.
    assert_eq!(state(m, "deaf"), InstanceState::Paused);
    assert_eq!(
        act(&p, "deaf", Action::Stop, true),
        OperationState::Succeeded
    );
}

#[test]
fn concurrent_starts_start_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let p = manager(dir.path());
    let m = &p.m;
    m.create(probe_instance("once", "hlt")).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (m, b) = (Arc::clone(m), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                m.action("once", request(Action::Start, false)).is_ok()
            })
        })
        .collect();
    let started = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(started, 1);
    assert!(
        wait_console(m, "once", "PROBE-OK hlt", 1),
        "{}",
        console(m, "once")
    );
    assert_eq!(
        act(&p, "once", Action::Stop, true),
        OperationState::Succeeded
    );
    // One VM ran: one banner.
    assert_eq!(console(m, "once").matches("KILN-PROBE").count(), 1);
}

#[test]
fn an_instance_defined_by_an_earlier_version_loads_and_starts() {
    // Earlier versions kept the image's name as the client gave it, and the disk's name
    // beside its id.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("instances")).unwrap();
    let old = serde_json::json!({
        "id": "7f0c6a4e-2b1d-4a51-9f37-3c1e8e2d9b10", "name": "old", "description": "",
        "vcpus": 1, "memory": 67108864,
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"},
        "disks": [], "network_interfaces": [], "auto_start": false,
        "created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:00.000Z",
        "generation": 2
    });
    let file = dir
        .path()
        .join("instances/7f0c6a4e-2b1d-4a51-9f37-3c1e8e2d9b10.json");
    std::fs::write(&file, old.to_string()).unwrap();
    let p = manager(dir.path());
    let inst = p.get("old").unwrap();
    assert_eq!(inst.kernel, "kiln-probe");
    assert_eq!(inst.def.generation, 2);
    assert_eq!(
        act(&p, "old", Action::Start, false),
        OperationState::Succeeded
    );
    assert!(
        wait_console(&p, "old", "PROBE-OK hlt", 1),
        "{}",
        console(&p, "old")
    );
    assert_eq!(
        act(&p, "old", Action::Stop, true),
        OperationState::Succeeded
    );
    // Saved again in the current format.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["boot"]["kernel"], control::PROBE_IMAGE_ID.to_string());
}
