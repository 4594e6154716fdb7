//! Snapshots through the real API of `kiln serve`, with the probe guest: an instance restored
//! from a snapshot counts on from where it was, its disk and NIC working, also after the
//! daemon restarted; clones of one snapshot diverge in memory and on disk; corrupt and
//! foreign snapshots are refused with nothing created; disk snapshots of a running disk,
//! listed, copied, rolled back and deleted.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::wire::{InstanceRestore, RestoreSource, SnapshotCreate};
use client::{Client, Method};
use common::netns::Netns;
use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// `kiln serve` started inside a network namespace (so that its guests' TAPs are there).
struct NsServer {
    child: Child,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl NsServer {
    fn start(ns: &Netns, dir: &Path) -> Self {
        require_kvm();
        let socket = dir.join("kiln.sock");
        let _ = std::fs::remove_file(&socket);
        let child = ns
            .command(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < end, "kiln serve does not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        NsServer {
            child,
            client: Client::unix(&socket),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn stop(mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    fn console(&self, name: &str) -> String {
        self.rt
            .block_on(self.client.instance_console(name, Some(0), None))
            .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
            .unwrap_or_default()
    }

    fn wait_console(&self, name: &str, what: &str) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.console(name);
            if text.contains(what) {
                return text;
            }
            assert!(
                Instant::now() < end,
                "no {what:?} in the console of {name}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn state(&self, name: &str) -> String {
        let i = self.rt.block_on(self.client.instance_get(name)).unwrap();
        serde_json::to_value(i.value.state)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn wait_state(&self, name: &str, state: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        while self.state(name) != state {
            assert!(Instant::now() < end, "{name} never got {state}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a console, without carriage returns.
fn lines(text: &str) -> Vec<&str> {
    text.lines().map(|l| l.trim_end_matches('\r')).collect()
}

/// The last `PROBE-COUNT` the console shows.
fn last_count(text: &str) -> u64 {
    lines(text)
        .iter()
        .filter_map(|l| l.strip_prefix("PROBE-COUNT "))
        .filter_map(|n| n.parse().ok())
        .next_back()
        .unwrap_or(0)
}

const TAP: &str = "ksnap0";
const HOST_IP: &str = "10.79.0.1";
const GUEST_IP: &str = "10.79.0.2";
const MAC: &str = "02:00:00:00:00:2b";

#[test]
fn a_restored_instance_counts_on_with_its_disk_and_nic_also_after_a_daemon_restart() {
    let ns = Netns::new("apisnap", TAP, HOST_IP);
    let tmp = tempfile::tempdir().unwrap();
    let s = NsServer::start(&ns, tmp.path());
    let cmds = format!(
        "blk-write:0:0:16:3,net-ip:0:{GUEST_IP},count:40,blk-verify:0:0:16:3,\
         blk-write:0:16:16:4,blk-verify:0:16:16:4,net-info:0,net-serve:0:6,poweroff"
    );
    let spec: client::wire::InstanceCreate = serde_json::from_value(json!({
        "name": "orig", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={cmds}")},
        "disks": [{"create": {"name": "orig-root", "size": "16MiB", "format": "qcow2"}}],
        "network_interfaces": [{"host_tap": TAP, "mac": MAC}],
        "start": true,
    }))
    .unwrap();
    s.rt.block_on(s.client.instance_create(&spec)).unwrap();
    s.wait_console("orig", "PROBE-COUNT 5");
    let snap =
        s.rt.block_on(s.client.instance_snapshot_create(
            "orig",
            &SnapshotCreate {
                name: "warm".into(),
                description: String::new(),
                stop: true,
            },
        ))
        .unwrap();
    s.wait_state("orig", "stopped");
    let at = last_count(&s.console("orig"));
    assert!((5..40).contains(&at), "snapshot at count {at}");
    assert!(
        snap.memory_saved < snap.memory / 2,
        "only touched pages are saved: {} of {}",
        snap.memory_saved,
        snap.memory
    );
    assert_eq!(snap.disks.len(), 1);

    // The daemon restarts: the snapshot is still there and restores.
    s.stop();
    let s = NsServer::start(&ns, tmp.path());
    let listed = s.rt.block_on(s.client.snapshot_list()).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "warm");
    s.rt.block_on(s.client.instance_delete("orig", false))
        .unwrap();
    let made =
        s.rt.block_on(s.client.instance_restore(&InstanceRestore {
            name: "back".into(),
            description: String::new(),
            source: RestoreSource {
                snapshot: "warm".into(),
            },
            count: None,
            fresh_mac: false,
            network_interfaces: Vec::new(),
            auto_start: false,
            start: true,
        }))
        .unwrap();
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].network_interfaces[0].mac.0.to_string(), MAC);
    assert_eq!(made[0].disks[0].disk, "back-disk0");

    let text = s.wait_console("back", &format!("PROBE-OK net-info net0 mac={MAC}"));
    // It went on from where it was: the history up to the snapshot, then the next count,
    // and no second boot.
    let l = lines(&text);
    assert_eq!(
        l.iter().filter(|x| **x == "PROBE-COUNT 1").count(),
        1,
        "{text}"
    );
    assert!(
        l.contains(&format!("PROBE-COUNT {}", at + 1).as_str()),
        "{text}"
    );
    assert!(l.contains(&"PROBE-OK count 40"), "{text}");
    // Its disk holds what it wrote before the snapshot, and takes new writes.
    assert_eq!(
        l.iter()
            .filter(|x| **x == "PROBE-OK blk-verify blk0 sectors=16")
            .count(),
        2,
        "{text}"
    );
    // Its NIC works: the host pings it.
    let ping = ns
        .command("ping")
        .args(["-q", "-c", "6", "-i", "0.05", "-W", "5", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    s.wait_console("back", "PROBE-OK net-serve net0 answered=6");
    s.wait_state("back", "stopped");
    // The restored instance's disk is an overlay on the snapshot: the snapshot stays while
    // the disk does.
    let err =
        s.rt.block_on(s.client.snapshot_delete("warm"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("back-disk0"), "{err}");
    s.stop();
}

/// Types `text` into an instance's serial port through the console websocket.
fn type_into(s: &Server, name: &str, text: &str) {
    use client::Message;
    use futures_util::SinkExt;
    s.block_on(async {
        let mut ws = s.client().instance_console_stream(name).await.unwrap();
        ws.send(Message::text(text)).await.unwrap();
        let _ = ws.close(None).await;
    });
}

fn create_probe(s: &Server, name: &str, cmds: &str, disk: Value) {
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances",
        json!({
            "name": name, "vcpus": 1, "memory": "64MiB",
            "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={cmds}")},
            "disks": [disk],
            "start": true,
        }),
    );
    assert_eq!(st, 201, "{v}");
}

#[test]
fn clones_of_one_snapshot_diverge_in_memory_and_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path());
    create_probe(
        &s,
        "src",
        "blk-write:0:0:8:1,note,recall,blk-verify:0:0:8:1,blk-write:0:0:8:9,\
         blk-verify:0:0:8:9,poweroff",
        json!({"create": {"name": "src-root", "size": "8MiB", "format": "qcow2"}}),
    );
    assert!(s.wait_console("src", "PROBE-OK note ready", 1));
    let (st, snap) = s.json(
        Method::POST,
        "/v1/instances/src/snapshots",
        json!({"name": "fork", "stop": true}),
    );
    assert_eq!(st, 201, "{snap}");
    assert!(s.wait_state("src", "stopped"));
    let (st, made) = s.json(
        Method::POST,
        "/v1/instances",
        json!({"name": "clone", "source": {"snapshot": "fork"}, "count": 2, "start": true}),
    );
    assert_eq!(st, 201, "{made}");
    let names: Vec<&str> = made
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["clone-1", "clone-2"]);
    assert_ne!(made[0]["disks"][0]["id"], made[1]["disks"][0]["id"]);
    assert!(s.wait_state("clone-1", "running") && s.wait_state("clone-2", "running"));

    // clone-1 notes "alpha" and overwrites its disk, to its end.
    type_into(&s, "clone-1", "alpha\n");
    assert!(s.wait_console("clone-1", "PROBE-OK recall alpha", 1));
    assert!(s.wait_console("clone-1", "PROBE-OK blk-verify blk0 sectors=8", 2));
    assert!(s.wait_state("clone-1", "stopped"));
    // clone-2 sees neither: its memory recalls its own note, its disk still has seed 1.
    type_into(&s, "clone-2", "beta\n");
    assert!(s.wait_console("clone-2", "PROBE-OK recall beta", 1));
    assert!(
        s.wait_console("clone-2", "PROBE-OK blk-verify blk0 sectors=8", 2),
        "{}",
        s.console("clone-2")
    );
    assert!(!s.console("clone-2").contains("alpha"));
    assert!(!s.console("clone-2").contains("PROBE-FAIL"));
    assert!(s.wait_state("clone-2", "stopped"));
    // The source's disk was not touched by either.
    let (st, bytes) = s.call_bytes(Method::GET, "/v1/disks/src-root/export", Vec::new());
    assert_eq!(st, 200);
    assert_eq!(bytes[..8 * 512], pattern_bytes(1, 0, 8 * 512)[..]);
}

#[test]
fn corrupt_and_foreign_snapshots_are_refused_with_nothing_created() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path());
    create_probe(
        &s,
        "src",
        "count",
        json!({"create": {"name": "src-root", "size": "4MiB", "format": "qcow2"}}),
    );
    assert!(s.wait_console("src", "PROBE-COUNT 2", 1));
    let (st, snap) = s.json(
        Method::POST,
        "/v1/instances/src/snapshots",
        json!({"name": "good", "stop": true}),
    );
    assert_eq!(st, 201, "{snap}");
    let id = snap["id"].as_str().unwrap();
    let state = s.state_dir.join("snapshots").join(id).join("state");
    let good = std::fs::read(&state).unwrap();
    let disks_before = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .count();

    // A flipped byte in the body: the checksum catches it. Another Kiln's snapshot: its
    // version is refused. A truncated one: corrupt.
    let mut corrupt = good.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let mut foreign = good.clone();
    let at = foreign
        .windows(5)
        .position(|w| w == env!("CARGO_PKG_VERSION").as_bytes())
        .unwrap();
    foreign[at] = b'9';
    for (bad, says) in [
        (corrupt, "corrupt"),
        (foreign, "written by Kiln 9"),
        (good[..good.len() / 2].to_vec(), "corrupt"),
    ] {
        std::fs::write(&state, &bad).unwrap();
        let (st, v) = s.json(
            Method::POST,
            "/v1/instances",
            json!({"name": "restored", "source": {"snapshot": "good"}, "start": true}),
        );
        assert_eq!(st, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("source.snapshot") && msg.contains(says),
            "{msg}"
        );
        let (_, list) = s.json(Method::GET, "/v1/instances", Value::Null);
        assert_eq!(list.as_array().unwrap().len(), 1, "nothing created: {list}");
        assert_eq!(
            std::fs::read_dir(s.state_dir.join("disks"))
                .unwrap()
                .count(),
            disks_before,
            "no disk file made"
        );
    }
    // Put back, it restores.
    std::fs::write(&state, &good).unwrap();
    // A stopped instance, bad bodies.
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances/src/snapshots",
        json!({"name": "other"}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    for (body, field) in [
        (
            json!({"name": "x", "source": {"snapshot": "nope"}}),
            "source.snapshot",
        ),
        (
            json!({"name": "x", "source": {"snapshot": "good"}, "count": 0}),
            "count",
        ),
        (
            json!({"name": "x", "source": {"snapshot": "good"}, "count": 100000}),
            "count",
        ),
        (
            json!({"name": "Bad", "source": {"snapshot": "good"}}),
            "name",
        ),
    ] {
        let (st, v) = s.json(Method::POST, "/v1/instances", body);
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances",
        json!({"name": "restored", "source": {"snapshot": "good"}, "start": true}),
    );
    assert_eq!(st, 201, "{v}");
    assert!(s.wait_state("restored", "running"));
}

#[test]
fn disk_snapshots_of_a_running_disk_list_copy_roll_back_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path());
    create_probe(
        &s,
        "vm",
        "blk-write:0:0:8:1,blk-flush:0,note,blk-write:0:0:8:2,blk-verify:0:0:8:2,poweroff",
        json!({"create": {"name": "data", "size": "8MiB", "format": "qcow2"}}),
    );
    assert!(s.wait_console("vm", "PROBE-OK note ready", 1));
    // Taken while the guest runs.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks/data/snapshots",
        json!({"name": "one"}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["name"], "one");
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks/data/snapshots",
        json!({"name": "one"}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("already_exists")),
        "{v}"
    );
    type_into(&s, "vm", "go\n");
    assert!(s.wait_console("vm", "PROBE-OK blk-verify blk0 sectors=8", 1));
    assert!(s.wait_state("vm", "stopped"));

    // QEMU sees it and finds the file sound.
    let file = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .unwrap();
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("one"));
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let (st, list) = s.json(Method::GET, "/v1/disks/data/snapshots", Value::Null);
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let export = |disk: &str| {
        let (st, bytes) =
            s.call_bytes(Method::GET, &format!("/v1/disks/{disk}/export"), Vec::new());
        assert_eq!(st, 200);
        bytes[..8 * 512].to_vec()
    };
    assert_eq!(
        export("data"),
        pattern_bytes(2, 0, 8 * 512),
        "the guest's later write"
    );
    // A disk made from the snapshot holds what the guest had written before it.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "copy", "source": {"type": "snapshot", "disk": "data", "snapshot": "one"}}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(export("copy"), pattern_bytes(1, 0, 8 * 512));
    // So does an image made from it, and a disk made from that image.
    let (st, v) = s.json(
        Method::POST,
        "/v1/images",
        json!({"name": "golden", "kind": "disk", "source": {"type": "snapshot", "disk": "data", "snapshot": "one"}}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["kind"].as_str(), v["uploaded"].as_bool()),
        (Some("disk"), Some(true)),
        "{v}"
    );
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "from-golden", "source": {"type": "image", "image": "golden"}}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(export("from-golden"), pattern_bytes(1, 0, 8 * 512));
    // Refused with nothing made: no such snapshot, not a disk image, both path and source.
    let images_dir = s.state_dir.join("images");
    let files = || std::fs::read_dir(&images_dir).map_or(0, |d| d.count());
    let before = files();
    for (body, field) in [
        (
            json!({"name": "bad", "kind": "disk", "source": {"type": "snapshot", "disk": "data", "snapshot": "nope"}}),
            "source.snapshot",
        ),
        (
            json!({"name": "bad", "kind": "kernel", "source": {"type": "snapshot", "disk": "data", "snapshot": "one"}}),
            "kind",
        ),
        (
            json!({"name": "bad", "kind": "disk", "path": "/x", "source": {"type": "snapshot", "disk": "data", "snapshot": "one"}}),
            "source",
        ),
        (json!({"name": "bad", "kind": "disk"}), "path"),
    ] {
        let (st, v) = s.json(Method::POST, "/v1/images", body);
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_value")),
            "{v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    assert_eq!(files(), before, "a refused image left a file behind");
    let (st, _) = s.json(Method::GET, "/v1/images/bad", Value::Null);
    assert_eq!(st, 404);
    // Rolled back (its instance is stopped), the disk is as it was.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks/data/snapshots/one/rollback",
        Value::Null,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(export("data"), pattern_bytes(1, 0, 8 * 512));
    let (st, _) = s.json(Method::DELETE, "/v1/disks/data/snapshots/one", Value::Null);
    assert_eq!(st, 204);
    let (st, v) = s.json(Method::GET, "/v1/disks/data/snapshots/one", Value::Null);
    assert_eq!(st, 404, "{v}");

    // A raw disk: a reflink or a copy beside it, rolled back the same way.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "flat", "size": "1MiB", "format": "raw"}),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks/flat/snapshots",
        json!({"name": "zero"}),
    );
    assert_eq!(st, 201, "{v}");
    assert!(v["actual_size"].is_u64(), "{v}");
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks/flat/snapshots/zero/rollback",
        Value::Null,
    );
    assert_eq!(st, 200, "{v}");
    let (st, _) = s.json(Method::DELETE, "/v1/disks/flat/snapshots/zero", Value::Null);
    assert_eq!(st, 204);
}
