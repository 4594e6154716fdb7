//! The sandbox of `kiln serve` (issue 10): every kind of thread runs under its seccomp filter
//! with NoNewPrivs; a vCPU that makes a call outside its list fails its own VM, named, and the
//! other VMs go on; `--no-sandbox` turns it off.

mod common;

use common::server::{action, Server};

use std::time::{Duration, Instant};

use client::Method;
use serde_json::{json, Value};

/// (thread name, `Seccomp:` and `NoNewPrivs:` of its status) for every thread of `pid`.
fn thread_sandbox(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

fn create(s: &Server, name: &str, cmdline: &str) {
    let body = json!({"name": name, "vcpus": 2, "memory": "32MiB", "start": true,
        "boot": {"kernel": "kiln-probe", "cmdline": cmdline}});
    let (st, v) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{v}");
}

fn kinds() -> [&'static str; 4] {
    ["tokio-rt-worker", "kiln-vm-", "kiln-events", "kiln-vcpu"]
}

#[test]
fn every_kind_of_thread_runs_under_its_filter() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "boxed", "console=ttyS0 probe=smp,hlt");
    assert!(s.wait_console("boxed", "PROBE-OK hlt", 1));
    let threads = thread_sandbox(s.child.id());
    for kind in kinds() {
        let of_kind: Vec<_> = threads.iter().filter(|t| t.0.starts_with(kind)).collect();
        assert!(!of_kind.is_empty(), "no {kind} thread: {threads:?}");
        for t in of_kind {
            assert_eq!((t.1.as_str(), t.2.as_str()), ("2", "1"), "{t:?}");
        }
    }
    // Every thread, the main one included.
    assert!(threads.iter().all(|t| t.1 == "2"), "{threads:?}");
    // The API still does its work under the filters: a disk, a stop, a delete.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "d", "size": "1MiB", "format": "qcow2"}),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = action(&s, "boxed", json!({"action": "stop", "force": true}));
    assert_eq!((st, v["state"].as_str()), (200, Some("stopped")), "{v}");
}

#[test]
fn no_sandbox_runs_without_filters() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--no-sandbox"]);
    create(&s, "open", "console=ttyS0 probe=hlt");
    assert!(s.wait_console("open", "PROBE-OK hlt", 1));
    let threads = thread_sandbox(s.child.id());
    let vcpu = threads
        .iter()
        .find(|t| t.0.starts_with("kiln-vcpu"))
        .unwrap();
    assert_eq!(vcpu.1, "0", "{threads:?}");
}

#[test]
fn a_forbidden_call_from_a_vcpu_fails_that_vm_only() {
    // The hook acts only in a VM whose command line asks for it (and with this variable).
    std::env::set_var("KILN_TEST_FORBIDDEN_SYSCALL", "1");
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "steady", "console=ttyS0 probe=hlt");
    assert!(s.wait_console("steady", "PROBE-OK hlt", 1));
    create(
        &s,
        "victim",
        "console=ttyS0 kiln.test-forbidden-syscall probe=hlt",
    );
    let end = Instant::now() + Duration::from_secs(20);
    let victim = loop {
        let (_, v) = s.json(Method::GET, "/v1/instances/victim", Value::Null);
        if v["state"] == "failed" || Instant::now() > end {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(victim["state"], "failed", "{victim}");
    let reason = victim["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sandbox refused the system call socket"),
        "{victim}"
    );
    let (_, steady) = s.json(Method::GET, "/v1/instances/steady", Value::Null);
    assert_eq!(steady["state"], "running", "{steady}");
    let (st, v) = action(&s, "victim", json!({"action": "start"}));
    assert_eq!(st, 200, "the daemon goes on: {v}");
}

/// Starts `kiln serve` with the Landlock self-test hook on `target`; returns its log once it
/// answers (then stops it).
fn open_outside(extra: &[&str], target: &std::path::Path) -> String {
    common::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let socket = dir.path().join("k.sock");
    let mut child = common::kiln()
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(extra)
        .env("KILN_LOG", "warn")
        .env("KILN_TEST_OPEN_AFTER_SANDBOX", target)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn a_file_outside_the_allowed_directories_cannot_be_opened_by_the_daemon() {
    let elsewhere = tempfile::tempdir().unwrap();
    let secret = elsewhere.path().join("secret");
    std::fs::write(&secret, b"not for kiln").unwrap();
    let log = open_outside(&[], &secret);
    assert!(
        log.contains("sandbox self-test: cannot open") && log.contains("Permission denied"),
        "{log}"
    );
    // Without the sandbox the same file opens: the refusal was Landlock's.
    let log = open_outside(&["--no-sandbox"], &secret);
    assert!(log.contains("sandbox self-test: opened"), "{log}");
}

#[test]
fn state_files_are_private_and_the_socket_has_its_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // A group other than ours, by name: `nogroup` or `users` on Debian.
    let group = ["nogroup", "users"]
        .into_iter()
        .find(|g| {
            std::fs::read_to_string("/etc/group")
                .unwrap()
                .lines()
                .any(|l| l.starts_with(&format!("{g}:")))
        })
        .expect("a group named nogroup or users");
    let s = Server::start_with(dir.path(), &["--socket-group", group]);
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "d", "size": "1MiB", "format": "qcow2"}),
    );
    assert_eq!(st, 201, "{v}");
    create(&s, "quiet", "console=ttyS0 probe=hlt");
    let mut seen = 0;
    for sub in ["disks", "instances"] {
        for e in std::fs::read_dir(s.state_dir.join(sub)).unwrap().flatten() {
            let mode = e.metadata().unwrap().mode() & 0o777;
            assert_eq!(mode & 0o007, 0, "{} has mode {mode:o}", e.path().display());
            seen += 1;
        }
    }
    assert!(seen >= 3, "{seen} files");
    let sock = std::fs::metadata(&s.socket).unwrap();
    let gid: u32 = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split(':').collect();
            (f[0] == group).then(|| f[2].parse().unwrap())
        })
        .unwrap();
    assert_eq!(sock.gid(), gid);
    assert_eq!(sock.mode() & 0o777, 0o660);
}

#[test]
fn user_runs_the_daemon_unprivileged_with_cap_net_admin_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    common::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // The user must reach the directories kiln makes for it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/kiln.sock");
    let state = dir.path().join("state");
    let mut child = common::kiln()
        .args(["serve", "--user", "nobody", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = client::Client::unix(&socket);
    let body = json!({"name": "plain", "vcpus": 1, "memory": "32MiB", "start": true,
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"}});
    let created = rt
        .block_on(c.request(Method::POST, "/v1/instances").json(&body).send())
        .unwrap();
    let state_now = || {
        let r = rt
            .block_on(c.request(Method::GET, "/v1/instances/plain").send())
            .unwrap();
        r.json::<Value>().unwrap()["state"].clone()
    };
    let end = Instant::now() + Duration::from_secs(20);
    while state_now() != "running" && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let running = state_now();
    let owner = std::fs::metadata(state.join("instances")).unwrap().uid();
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    assert_eq!(created.status.as_u16(), 201, "{}", created.text());
    assert_eq!(field("Uid:"), "65534", "{status}");
    assert_eq!(field("CapEff:"), "0000000000001000", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    assert_eq!(running, "running");
    assert_eq!(owner, 65534);
}
