//! The instance manager over real KVM: the lifecycle of API.md, its refusals, and restarts
//! on the same state directory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{
    Action, ActionKind, InstanceCreate, InstanceState, Manager, ManagerError, OperationState,
};
use vmm::Host;

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

fn manager(dir: &std::path::Path) -> Arc<Manager> {
    common::require_kvm();
    Manager::open(Arc::new(Host::open().unwrap()), dir, &[], Arc::from(PROBE)).unwrap()
}

fn spec(json: serde_json::Value) -> InstanceCreate {
    serde_json::from_value(json).unwrap()
}

fn probe_instance(name: &str, cmds: &str) -> InstanceCreate {
    spec(serde_json::json!({
        "name": name, "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={cmds}")}
    }))
}

fn act(m: &Arc<Manager>, name: &str, action: ActionKind, force: bool) -> OperationState {
    let op = m
        .action(
            name,
            Action {
                action,
                force,
                timeout_s: 10,
            },
        )
        .unwrap();
    m.operations
        .wait(op.id, Duration::from_secs(60))
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
    m.get(name).unwrap().state
}

#[test]
fn lifecycle_start_stop_reboot_delete() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let (inst, op) = m
        .create(probe_instance("web-1", "wait-powerbutton"))
        .unwrap();
    assert!(op.is_none());
    assert_eq!(inst.state, InstanceState::Stopped);

    assert_eq!(
        act(&m, "web-1", ActionKind::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Running);
    assert!(m.get("web-1").unwrap().started_at.is_some());
    assert!(
        wait_console(&m, "web-1", "PROBE-OK wait-powerbutton armed", 1),
        "{}",
        console(&m, "web-1")
    );

    // Graceful stop: the guest sees the power button and powers off.
    assert_eq!(
        act(&m, "web-1", ActionKind::Stop, false),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Stopped);
    assert!(console(&m, "web-1").contains("PROBE-OK powerbutton pressed"));

    // Start again: the history keeps the first run.
    assert_eq!(
        act(&m, "web-1", ActionKind::Start, false),
        OperationState::Succeeded
    );
    assert!(wait_console(
        &m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        2
    ));
    assert_eq!(console(&m, "web-1").matches("KILN-PROBE v1 ").count(), 2);

    // Hard reboot in place, then a graceful one (power button, boot again).
    assert_eq!(
        act(&m, "web-1", ActionKind::Reboot, true),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Running);
    assert!(wait_console(
        &m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        3
    ));
    assert_eq!(
        act(&m, "web-1", ActionKind::Reboot, false),
        OperationState::Succeeded
    );
    assert!(wait_console(
        &m,
        "web-1",
        "PROBE-OK wait-powerbutton armed",
        4
    ));
    assert_eq!(console(&m, "web-1").matches("KILN-PROBE v1 ").count(), 4);

    // Pause and resume, then refusals that fit the state.
    assert_eq!(
        act(&m, "web-1", ActionKind::Pause, false),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Paused);
    assert_eq!(
        act(&m, "web-1", ActionKind::Resume, false),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Running);
    let start = m.action(
        "web-1",
        Action {
            action: ActionKind::Start,
            force: false,
            timeout_s: 1,
        },
    );
    assert!(
        matches!(
            start,
            Err(ManagerError::InvalidState {
                state: InstanceState::Running,
                ..
            })
        ),
        "{start:?}"
    );
    assert!(matches!(
        m.delete("web-1", false),
        Err(ManagerError::InvalidState { .. })
    ));

    // Force stop and delete.
    assert_eq!(
        act(&m, "web-1", ActionKind::Stop, true),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "web-1"), InstanceState::Stopped);
    m.delete("web-1", false).unwrap();
    assert!(matches!(m.get("web-1"), Err(ManagerError::NotFound(..))));
    assert!(m.list().is_empty());
    let states: Vec<String> = m
        .events
        .since(0, Duration::ZERO)
        .into_iter()
        .map(|e| e.state)
        .collect();
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
    let m = manager(dir.path());
    m.create(probe_instance("a", "hlt")).unwrap();
    m.create(probe_instance("b", "wait-powerbutton")).unwrap();
    assert_eq!(
        act(&m, "a", ActionKind::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(
        act(&m, "b", ActionKind::Start, false),
        OperationState::Succeeded
    );
    assert_eq!(
        act(&m, "a", ActionKind::Stop, true),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "a"), InstanceState::Stopped);
    assert_eq!(state(&m, "b"), InstanceState::Running);
    assert!(wait_console(&m, "b", "armed", 1));
    assert_eq!(
        act(&m, "b", ActionKind::Stop, false),
        OperationState::Succeeded
    );
    assert_eq!(state(&m, "b"), InstanceState::Stopped);
}

#[test]
fn bad_definitions_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let field = |r: Result<_, ManagerError>| match r {
        Err(ManagerError::InvalidValue { field, .. }) => field,
        other => panic!("{:?}", other.map(|_| ())),
    };
    let mut s = probe_instance("ok", "hlt");
    s.vcpus = 0;
    assert_eq!(field(m.create(s)), "vcpus");
    let s = spec(
        serde_json::json!({"name": "x", "vcpus": 1, "memory": "12XB", "boot": {"kernel": "kiln-probe"}}),
    );
    assert_eq!(field(m.create(s)), "memory");
    assert_eq!(field(m.create(probe_instance("a/b", "hlt"))), "name");
    let s = spec(
        serde_json::json!({"name": "x", "vcpus": 1, "memory": 67108864, "boot": {"kernel": "nope"}}),
    );
    assert_eq!(field(m.create(s)), "boot.kernel");
    let s = spec(
        serde_json::json!({"name": "big", "vcpus": 1, "memory": "64TiB", "boot": {"kernel": "kiln-probe"}}),
    );
    assert!(matches!(
        m.create(s),
        Err(ManagerError::InsufficientCapacity(_))
    ));
    m.create(probe_instance("dup", "hlt")).unwrap();
    assert!(matches!(
        m.create(probe_instance("dup", "hlt")),
        Err(ManagerError::AlreadyExists(..))
    ));
    assert!(matches!(
        m.action(
            "ghost",
            Action {
                action: ActionKind::Start,
                force: false,
                timeout_s: 1
            }
        ),
        Err(ManagerError::NotFound(..))
    ));
    assert_eq!(m.list().len(), 1, "nothing half-made");
    // Unknown fields are refused by the definition's parser.
    let unknown = serde_json::from_value::<InstanceCreate>(
        serde_json::json!({"name": "x", "vcpus": 1, "memory": 1, "boot": {"kernel": "k"}, "colour": 1}),
    );
    assert!(unknown.unwrap_err().to_string().contains("colour"));
}

#[test]
fn definitions_survive_a_restart_and_auto_start_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = manager(dir.path());
        m.create(probe_instance("keep", "hlt")).unwrap();
        let mut s = probe_instance("auto", "hlt");
        s.auto_start = true;
        m.create(s).unwrap();
        assert_eq!(
            act(&m, "keep", ActionKind::Start, false),
            OperationState::Succeeded
        );
        m.shutdown();
    }
    let m = manager(dir.path());
    let mut names: Vec<String> = m.list().into_iter().map(|i| i.def.name).collect();
    names.sort();
    assert_eq!(names, ["auto", "keep"]);
    assert_eq!(state(&m, "keep"), InstanceState::Stopped);
    let end = Instant::now() + Duration::from_secs(30);
    while state(&m, "auto") != InstanceState::Running && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(state(&m, "auto"), InstanceState::Running);
    m.shutdown();
}

#[test]
fn console_input_to_a_guest_that_does_not_read_is_refused_not_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    m.create(probe_instance("deaf", "hlt")).unwrap();
    assert_eq!(
        act(&m, "deaf", ActionKind::Start, false),
        OperationState::Succeeded
    );
    assert!(
        wait_console(&m, "deaf", "PROBE-OK hlt", 1),
        "{}",
        console(&m, "deaf")
    );
    assert_eq!(
        act(&m, "deaf", ActionKind::Pause, false),
        OperationState::Succeeded
    );
    // A paused guest reads nothing: a pipe's worth of input fills up.
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = m.clone();
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
    assert!(matches!(r, Err(ManagerError::InUse(_))), "{r:?}");
    // The manager still answers, and the instance can be stopped.
    assert_eq!(m.get("deaf").unwrap().state, InstanceState::Paused);
    assert_eq!(
        act(&m, "deaf", ActionKind::Stop, true),
        OperationState::Succeeded
    );
}

#[test]
fn concurrent_starts_start_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    m.create(probe_instance("once", "hlt")).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (m, b) = (m.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                m.action(
                    "once",
                    Action {
                        action: ActionKind::Start,
                        force: false,
                        timeout_s: 10,
                    },
                )
                .is_ok()
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
        wait_console(&m, "once", "PROBE-OK hlt", 1),
        "{}",
        console(&m, "once")
    );
    assert_eq!(
        act(&m, "once", ActionKind::Stop, true),
        OperationState::Succeeded
    );
    // One VM ran: one banner.
    assert_eq!(console(&m, "once").matches("KILN-PROBE").count(), 1);
}
