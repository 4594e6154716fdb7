//! `kiln snapshot …` against a real `kiln serve`: an instance snapshotted and stopped,
//! restored and cloned from the CLI, disk snapshots created, listed, rolled back and deleted,
//! refusals in one line.

mod common;

use std::time::Duration;

use common::server::Server;
use common::{run_kiln, Run};
use serde_json::{json, Value};

/// `kiln ARGS --socket S`, which must end as `status` says.
fn kiln(s: &Server, args: &[&str], status: i32) -> Run {
    let socket = s.socket.to_str().unwrap();
    let mut a = args.to_vec();
    a.extend_from_slice(&["--socket", socket]);
    let r = run_kiln(&a, Duration::from_secs(120));
    assert!(
        !r.timed_out && !r.stderr.contains("panicked"),
        "{args:?}: {}",
        r.dump()
    );
    assert_eq!(r.status, Some(status), "{args:?}: {}", r.dump());
    r
}

/// `kiln ARGS --json`, parsed.
fn json_of(s: &Server, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let r = kiln(s, &a, 0);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", r.dump()))
}

#[test]
fn snapshot_restore_clone_and_disk_snapshots_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path());
    let (st, v) = s.json(
        client::Method::POST,
        "/v1/instances",
        json!({"name": "src", "vcpus": 1, "memory": "64MiB",
               "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=count"},
               "disks": [{"create": {"name": "root", "size": "4MiB", "format": "qcow2"}}],
               "start": true}),
    );
    assert_eq!(st, 201, "{v}");
    assert!(s.wait_console("src", "PROBE-COUNT 3", 1));

    let snap = json_of(&s, &["snapshot", "create", "src", "warm", "--stop"]);
    assert_eq!(snap["name"], "warm");
    assert!(s.wait_state("src", "stopped"));
    let table = kiln(&s, &["snapshot", "list"], 0).stdout;
    assert!(table.contains("warm") && table.contains("src"), "{table}");
    let one = json_of(&s, &["snapshot", "restore", "warm", "back", "--start"]);
    assert_eq!(one[0]["name"], "back");
    assert!(s.wait_state("back", "running"));
    let clones = json_of(&s, &["snapshot", "restore", "warm", "many", "--count", "2"]);
    assert_eq!(clones.as_array().unwrap().len(), 2, "{clones}");
    let r = kiln(&s, &["snapshot", "restore", "nope", "x"], 1);
    assert!(r.stderr.contains("source.snapshot"), "{}", r.dump());

    let d = json_of(&s, &["snapshot", "disk", "create", "root", "first"]);
    assert_eq!(d["name"], "first");
    let list = json_of(&s, &["snapshot", "disk", "list", "root"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let img = json_of(
        &s,
        &["snapshot", "disk", "image", "root", "first", "root-golden"],
    );
    assert_eq!(
        (img["name"].as_str(), img["kind"].as_str()),
        (Some("root-golden"), Some("disk")),
        "{img}"
    );
    let r = kiln(
        &s,
        &["snapshot", "disk", "image", "root", "nope", "other"],
        1,
    );
    assert!(r.stderr.contains("source.snapshot"), "{}", r.dump());
    let rolled = json_of(&s, &["snapshot", "disk", "rollback", "root", "first"]);
    assert_eq!(rolled["name"], "root");
    kiln(&s, &["snapshot", "disk", "delete", "root", "first"], 0);
    let list = json_of(&s, &["snapshot", "disk", "list", "root"]);
    assert_eq!(list, json!([]));
    // Disks are made from the snapshot: it stays.
    let r = kiln(&s, &["snapshot", "delete", "warm"], 1);
    assert!(
        r.stderr.contains("in use") || r.stderr.contains("base of disk"),
        "{}",
        r.dump()
    );
}
