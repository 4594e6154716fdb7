//! `kiln disk …` and `kiln image …` against a real `kiln serve`: import and export stream a
//! file both ways byte for byte; create, list, show, grow, attach, detach and delete with their
//! JSON and tables; refusals in one line.

mod common;

use common::server::Server;
use common::{pattern_bytes, run_kiln, Run};

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// `kiln ARGS --socket S`.
fn kiln(s: &Server, args: &[&str]) -> Run {
    let socket = s.socket.to_str().unwrap();
    let mut a = args.to_vec();
    a.extend_from_slice(&["--socket", socket]);
    let r = run_kiln(&a, Duration::from_secs(120));
    assert!(!r.timed_out, "{args:?}: {}", r.dump());
    assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.dump());
    r
}

/// `kiln ARGS`, which must succeed.
fn ok(s: &Server, args: &[&str]) -> Run {
    let r = kiln(s, args);
    assert_eq!(r.status, Some(0), "{args:?}: {}", r.dump());
    r
}

/// `kiln ARGS --json`, parsed.
fn json(s: &Server, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let r = ok(s, &a);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", r.dump()))
}

/// `kiln ARGS`, which must fail with one line on stderr containing `want`.
fn refused(s: &Server, args: &[&str], want: &str) {
    let r = kiln(s, args);
    assert_eq!(r.status, Some(1), "{args:?}: {}", r.dump());
    let lines: Vec<_> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {}", r.dump());
    assert!(lines[0].contains(want), "{args:?}: {want:?}: {}", r.dump());
}

fn names(list: &Value) -> Vec<String> {
    let mut n: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn import_then_export_gives_back_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let data = pattern_bytes(0x5a, 0, 8 << 20);
    let src = dir.path().join("pattern.raw");
    std::fs::write(&src, &data).unwrap();

    // Quiet on success when stderr is not a terminal: no progress bar in logs.
    let r = ok(&s, &["disk", "import", p(&src), "--name", "pat"]);
    assert!(r.stderr.is_empty(), "{}", r.dump());
    assert!(r.stdout.contains("pat"), "{}", r.dump());
    let d = json(&s, &["disk", "show", "pat"]);
    assert_eq!(d["size"], 8 << 20, "{d}");
    assert_eq!(d["format"], "raw", "{d}");

    let out = dir.path().join("exported.raw");
    let r = ok(&s, &["disk", "export", "pat", p(&out)]);
    assert!(r.stderr.is_empty(), "{}", r.dump());
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "the exported disk differs from the imported file"
    );
    // No temporary file left beside it.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln-part"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The other way round through qcow2: exported as qcow2, imported again (its format found
    // from the file's magic), exported raw: the same bytes.
    let q = dir.path().join("exported.qcow2");
    ok(&s, &["disk", "export", "pat", p(&q), "--format", "qcow2"]);
    assert_eq!(&std::fs::read(&q).unwrap()[..4], b"QFI\xfb");
    ok(&s, &["disk", "import", p(&q), "--name", "pat-q"]);
    assert_eq!(json(&s, &["disk", "show", "pat-q"])["format"], "qcow2");
    let again = dir.path().join("again.raw");
    ok(&s, &["disk", "export", "pat-q", p(&again)]);
    assert!(
        std::fs::read(&again).unwrap() == data,
        "qcow2 round trip differs"
    );

    // Refusals: the name is taken; the file is missing; the disk is missing.
    refused(
        &s,
        &["disk", "import", p(&src), "--name", "pat"],
        "already_exists",
    );
    refused(
        &s,
        &["disk", "import", "/nonexistent/file.raw", "--name", "x"],
        "/nonexistent/file.raw",
    );
    refused(
        &s,
        &["disk", "export", "ghost", p(&dir.path().join("g.raw"))],
        "not_found",
    );
    assert!(!dir.path().join("g.raw").exists());
}

#[test]
fn disks_are_created_listed_attached_grown_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    assert_eq!(json(&s, &["disk", "list"]), Value::Array(vec![]));

    let d = json(&s, &["disk", "create", "data", "--size", "64MiB"]);
    assert_eq!(d["name"], "data");
    assert_eq!(d["size"], 64 << 20);
    assert_eq!(d["format"], "raw");
    assert!(d["attached_to"].is_null(), "{d}");
    assert!(d["id"].as_str().is_some_and(|i| i.len() == 36), "{d}");
    let q = json(
        &s,
        &[
            "disk", "create", "scratch", "--size",
            // A bare number is MiB, as everywhere in the CLI.
            "1024", "--format", "qcow2",
        ],
    );
    assert_eq!(
        (q["size"].as_u64(), q["format"].as_str()),
        (Some(1 << 30), Some("qcow2"))
    );
    assert_eq!(names(&json(&s, &["disk", "list"])), ["data", "scratch"]);

    // The table: a header and a row per disk with a readable size.
    let t = ok(&s, &["disk", "list"]).stdout;
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SIZE"),
        "{t}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("data") && l.contains("64MiB")),
        "{t}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("scratch") && l.contains("1GiB")),
        "{t}"
    );

    // Attach to a stopped instance; an attached disk is not deleted or grown.
    ok(&s, &["instance", "create", "vm", "--memory", "64MiB"]);
    ok(&s, &["disk", "attach", "vm", "data", "--read-only"]);
    let inst = json(&s, &["instance", "show", "vm"]);
    assert_eq!(inst["disks"][0]["disk"], "data", "{inst}");
    assert_eq!(inst["disks"][0]["read_only"], true, "{inst}");
    let d = json(&s, &["disk", "show", "data"]);
    assert!(!d["attached_to"].is_null(), "{d}");
    refused(&s, &["disk", "delete", "data"], "in_use");
    ok(&s, &["disk", "detach", "vm", "data"]);
    assert!(json(&s, &["disk", "show", "data"])["attached_to"].is_null());

    // A disk named at create time, read-only: the guest sees it so.
    ok(
        &s,
        &[
            "instance",
            "create",
            "vm2",
            "--memory",
            "64MiB",
            "--disk",
            "scratch:ro",
            "--cmdline",
            "console=ttyS0 probe=blk-info:0,poweroff",
            "--start",
        ],
    );
    assert!(s.wait_state("vm2", "stopped"), "{}", s.console("vm2"));
    assert!(
        s.console("vm2")
            .contains("PROBE-OK blk-info blk0 capacity=2097152 "),
        "{}",
        s.console("vm2")
    );
    assert!(s.console("vm2").contains(" ro=1 "), "{}", s.console("vm2"));
    ok(&s, &["instance", "delete", "vm2"]);

    // Grow; never shrink.
    let d = json(&s, &["disk", "grow", "data", "128MiB"]);
    assert_eq!(d["size"], 128 << 20, "{d}");
    refused(&s, &["disk", "grow", "data", "1MiB"], "size");

    // Bad input gets the server's message, in one line.
    refused(
        &s,
        &["disk", "create", "Bad/Name", "--size", "1MiB"],
        "name",
    );
    refused(&s, &["disk", "create", "huge", "--size", "12XB"], "size");
    refused(
        &s,
        &["disk", "create", "data", "--size", "1MiB"],
        "already_exists",
    );
    refused(&s, &["disk", "show", "ghost"], "not_found");

    ok(&s, &["disk", "delete", "data"]);
    ok(&s, &["disk", "delete", "scratch"]);
    assert_eq!(json(&s, &["disk", "list"]), Value::Array(vec![]));
    refused(&s, &["disk", "delete", "data"], "not_found");
}

#[test]
fn images_are_registered_uploaded_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let s = Server::start_with(dir.path(), &["--image-dir", p(&images)]);
    assert_eq!(names(&json(&s, &["image", "list"])), ["kiln-probe"]);

    let data = pattern_bytes(7, 0, 1 << 20);
    std::fs::write(images.join("base.raw"), &data).unwrap();
    let i = json(
        &s,
        &[
            "image",
            "add",
            "base",
            "--kind",
            "disk",
            "--path",
            p(&images.join("base.raw")),
        ],
    );
    assert_eq!(
        (i["name"].as_str(), i["kind"].as_str()),
        (Some("base"), Some("disk")),
        "{i}"
    );
    let local = dir.path().join("local.raw");
    std::fs::write(&local, &data).unwrap();
    let r = ok(
        &s,
        &[
            "image",
            "add",
            "up",
            "--kind",
            "disk",
            "--upload",
            p(&local),
        ],
    );
    assert!(r.stderr.is_empty(), "{}", r.dump());
    assert_eq!(
        names(&json(&s, &["image", "list"])),
        ["base", "kiln-probe", "up"]
    );
    assert!(ok(&s, &["image", "list"]).stdout.starts_with("NAME"));

    // A disk made from the uploaded image has its bytes.
    ok(&s, &["disk", "create", "from-up", "--from-image", "up"]);
    let out = dir.path().join("from-up.raw");
    ok(&s, &["disk", "export", "from-up", p(&out)]);
    assert!(std::fs::read(&out).unwrap() == data);

    refused(
        &s,
        &[
            "image",
            "add",
            "outside",
            "--kind",
            "disk",
            "--path",
            p(&local),
        ],
        "path",
    );
    refused(&s, &["image", "delete", "kiln-probe"], "kiln-probe");
    ok(&s, &["image", "delete", "base"]);
    refused(&s, &["image", "show", "base"], "not_found");
}
