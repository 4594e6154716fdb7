//! Disks and images over `kiln serve`'s Unix socket: create, attach, boot the probe guest on
//! them, ETags, refusals, import/export, and a restart on the same state directory.

mod common;

use common::server::{action, Server};

use std::path::Path;

use client::Method;
use serde_json::{json, Value};

fn disk_file(s: &Server, disk: &Value) -> std::path::PathBuf {
    s.state_dir.join("disks").join(format!(
        "{}.{}",
        disk["id"].as_str().unwrap(),
        disk["format"].as_str().unwrap()
    ))
}

#[test]
fn blank_disk_attached_to_an_instance_holds_what_the_guest_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let (st, disk) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "data", "size": "8MiB"}),
    );
    assert_eq!(st, 201, "{disk}");
    assert_eq!(disk["size"], 8 << 20);
    assert_eq!(disk["format"], "raw");
    assert_eq!(disk["attached_to"], Value::Null);
    let file = disk_file(&s, &disk);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 8 << 20);

    let body = json!({"name": "writer", "vcpus": 1, "memory": "64MiB",
        "disks": [{"disk": "data"}],
        "boot": {"kernel": "kiln-probe",
                 "cmdline": "console=ttyS0 probe=blk-info:0,blk-id:0,blk-write:0:16:64:7,blk-flush:0,poweroff"}});
    let (st, inst) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{inst}");
    assert_eq!(inst["disks"][0]["disk"], "data");
    assert_eq!(
        s.json(Method::GET, "/v1/disks/data", Value::Null).1["attached_to"],
        "writer"
    );
    let (st, _) = action(&s, "writer", json!({"action": "start"}));
    assert!(st == 200 || st == 409, "start: {st}");
    assert!(s.wait_state("writer", "stopped"), "{}", s.console("writer"));
    let console = s.console("writer");
    assert!(
        console.contains("PROBE-OK blk-info blk0 capacity=16384 "),
        "{console}"
    );
    assert!(console.contains("PROBE-OK blk-id blk0 data"), "{console}");
    assert!(
        console.contains("PROBE-OK blk-write blk0 sectors=64"),
        "{console}"
    );
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        &bytes[16 * 512..80 * 512],
        &common::pattern_bytes(7, 16 * 512, 64 * 512)[..]
    );
    assert!(bytes[..16 * 512].iter().all(|b| *b == 0));

    // Attached: not deletable; detach it (the instance is stopped), then delete.
    let (st, e) = s.json(Method::DELETE, "/v1/disks/data", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
    let (st, inst) = s.json(
        Method::DELETE,
        "/v1/instances/writer/disks/data",
        Value::Null,
    );
    assert_eq!(st, 200, "{inst}");
    assert_eq!(inst["disks"], json!([]));
    assert_eq!(s.json(Method::DELETE, "/v1/disks/data", Value::Null).0, 204);
    assert!(!file.exists());
    assert_eq!(s.json(Method::GET, "/v1/disks/data", Value::Null).0, 404);
}

#[test]
fn attach_and_detach_only_while_stopped_and_etags_guard_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    assert_eq!(
        s.json(
            Method::POST,
            "/v1/disks",
            json!({"name": "d1", "size": 1048576, "format": "qcow2"})
        )
        .0,
        201
    );
    let body = json!({"name": "idle", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    assert_eq!(action(&s, "idle", json!({"action": "start"})).0, 200);

    let (st, e) = s.json(
        Method::POST,
        "/v1/instances/idle/disks",
        json!({"disk": "d1"}),
    );
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("running"),
        "{e}"
    );
    let (st, e) = s.json(Method::PATCH, "/v1/instances/idle", json!({"vcpus": 2}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    assert_eq!(
        action(&s, "idle", json!({"action": "stop", "force": true})).0,
        200
    );

    let (st, inst) = s.json(
        Method::POST,
        "/v1/instances/idle/disks",
        json!({"disk": "d1", "read_only": true}),
    );
    assert_eq!(st, 200, "{inst}");
    assert_eq!(
        inst["disks"][0],
        json!({"id": inst["disks"][0]["id"], "disk": "d1", "read_only": true})
    );
    let (st, e) = s.json(
        Method::POST,
        "/v1/instances/idle/disks",
        json!({"disk": "d1"}),
    );
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
    let (st, e) = s.json(
        Method::POST,
        "/v1/instances/idle/disks",
        json!({"disk": "nope"}),
    );
    assert_eq!(st, 400, "{e}");
    assert_eq!(
        s.json(Method::DELETE, "/v1/instances/idle/disks/nope", Value::Null)
            .0,
        404
    );

    // ETags: a stale If-Match is refused with 412, the current one goes through.
    let (_, headers, _) = s.json_with(Method::GET, "/v1/instances/idle", Value::Null, &[]);
    let etag = headers["etag"].to_str().unwrap().to_string();
    let (st, h2, inst) = s.json_with(
        Method::PATCH,
        "/v1/instances/idle",
        json!({"description": "first", "vcpus": 2, "memory": "128MiB"}),
        &[("if-match", &etag)],
    );
    assert_eq!(st, 200, "{inst}");
    assert_eq!(
        (inst["vcpus"].as_u64(), inst["memory"].as_u64()),
        (Some(2), Some(128 << 20))
    );
    assert_ne!(h2["etag"].to_str().unwrap(), etag);
    let (st, _, e) = s.json_with(
        Method::PATCH,
        "/v1/instances/idle",
        json!({"description": "second"}),
        &[("if-match", &etag)],
    );
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (412, Some("precondition_failed")),
        "{e}"
    );
    assert_eq!(
        s.json(Method::GET, "/v1/instances/idle", Value::Null).1["description"],
        "first"
    );
    let (st, e) = s.json(Method::PATCH, "/v1/instances/idle", json!({"vcpus": 0}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_value")),
        "{e}"
    );
    let (st, e) = s.json(
        Method::PATCH,
        "/v1/instances/idle",
        json!({"colour": "red"}),
    );
    assert_eq!(st, 400, "{e}");

    // Disks: grow only while detached, never shrink; rename shows in the attachment.
    let (st, e) = s.json(Method::PATCH, "/v1/disks/d1", json!({"size": "2MiB"}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
    let (st, inst) = s.json(Method::PATCH, "/v1/disks/d1", json!({"name": "logs"}));
    assert_eq!(st, 200, "{inst}");
    assert_eq!(
        s.json(Method::GET, "/v1/instances/idle", Value::Null).1["disks"][0]["disk"],
        "logs"
    );
    assert_eq!(
        s.json(Method::DELETE, "/v1/instances/idle/disks/logs", Value::Null)
            .0,
        200
    );
    let (st, d) = s.json(Method::PATCH, "/v1/disks/logs", json!({"size": "2MiB"}));
    assert_eq!((st, d["size"].as_u64()), (200, Some(2 << 20)), "{d}");
    let (st, e) = s.json(Method::PATCH, "/v1/disks/logs", json!({"size": "1MiB"}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_value")),
        "{e}"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["check"])
        .arg(disk_file(&s, &d))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_disk_requests_get_the_documented_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let cases = [
        (json!({"name": "a", "size": "12XB"}), 400, "size"),
        (json!({"name": "a/b", "size": "1MiB"}), 400, "name"),
        (json!({"name": "a"}), 400, "size"),
        (json!({"name": "a", "size": 1000}), 400, "size"),
        (
            json!({"name": "a", "size": "1MiB", "format": "vmdk"}),
            400,
            "format",
        ),
        (
            json!({"name": "a", "size": "1MiB", "block_size": 1000}),
            400,
            "block_size",
        ),
        (
            json!({"name": "a", "size": "1MiB", "colour": 1}),
            400,
            "colour",
        ),
        (
            json!({"name": "a", "source": {"type": "image", "image": "nope"}}),
            400,
            "source.image",
        ),
        (
            json!({"name": "a", "source": {"type": "image", "image": "kiln-probe"}}),
            400,
            "source.image",
        ),
        (
            json!({"name": "a", "source": {"type": "disk", "disk": "nope"}}),
            400,
            "source.disk",
        ),
    ];
    for (body, status, field) in cases {
        let (st, e) = s.json(Method::POST, "/v1/disks", body.clone());
        assert_eq!(st, status, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {e}"
        );
    }
    assert_eq!(s.json(Method::GET, "/v1/disks", Value::Null).1, json!([]));
    // An instance whose second disk is bad is not created, and its first (new) disk neither.
    let body = json!({"name": "vm", "vcpus": 1, "memory": "64MiB",
        "disks": [{"create": {"name": "fresh", "size": "1MiB"}}, {"disk": "missing"}],
        "boot": {"kernel": "kiln-probe"}});
    let (st, e) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disks[1].disk"),
        "{e}"
    );
    assert_eq!(s.json(Method::GET, "/v1/disks", Value::Null).1, json!([]));
    assert_eq!(
        s.json(Method::GET, "/v1/instances", Value::Null).1,
        json!([])
    );
    let left: Vec<_> = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(s.json(Method::GET, "/v1/disks/nope", Value::Null).0, 404);
    let (st, e) = s.json(Method::DELETE, "/v1/images/kiln-probe", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
}

fn write_pattern_image(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let bytes = common::pattern_bytes(seed, 0, len);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn a_disk_made_from_an_image_takes_the_guest_writes_and_the_image_stays_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let imgdir = dir.path().join("images");
    std::fs::create_dir(&imgdir).unwrap();
    let base = imgdir.join("base.raw");
    let original = write_pattern_image(&base, 4 << 20, 3);
    let s = Server::start_with(dir.path(), &["--image-dir", imgdir.to_str().unwrap()]);

    // Registration: only files inside an image directory.
    let (st, e) = s.json(
        Method::POST,
        "/v1/images",
        json!({"name": "passwd", "kind": "disk", "path": "/etc/passwd"}),
    );
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_value")),
        "{e}"
    );
    let sneaky = format!("{}/../../../etc/passwd", imgdir.display());
    assert_eq!(
        s.json(
            Method::POST,
            "/v1/images",
            json!({"name": "p2", "kind": "kernel", "path": sneaky})
        )
        .0,
        400
    );
    let (st, img) = s.json(
        Method::POST,
        "/v1/images",
        json!({"name": "base", "kind": "disk", "path": base}),
    );
    assert_eq!(st, 201, "{img}");
    assert_eq!(
        (img["format"].as_str(), img["size"].as_u64()),
        (Some("raw"), Some(4 << 20))
    );
    let names: Vec<_> = s
        .json(Method::GET, "/v1/images", Value::Null)
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kiln-probe", "base"]);

    // The disk is a qcow2 overlay on the image; the guest verifies the image's bytes through
    // it, then overwrites some of them.
    let body = json!({"name": "vm", "vcpus": 1, "memory": "64MiB",
        "disks": [{"create": {"name": "root", "source": {"type": "image", "image": "base"}}}],
        "boot": {"kernel": "kiln-probe",
                 "cmdline": "console=ttyS0 probe=blk-verify:0:0:8192:3,blk-write:0:100:50:9,blk-flush:0,poweroff"}});
    let (st, inst) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{inst}");
    let disk = s.json(Method::GET, "/v1/disks/root", Value::Null).1;
    assert_eq!(
        (disk["format"].as_str(), disk["size"].as_u64()),
        (Some("qcow2"), Some(4 << 20))
    );
    action(&s, "vm", json!({"action": "start"}));
    assert!(s.wait_state("vm", "stopped"), "{}", s.console("vm"));
    let console = s.console("vm");
    assert!(
        console.contains("PROBE-OK blk-verify blk0 sectors=8192"),
        "{console}"
    );
    assert!(
        console.contains("PROBE-OK blk-write blk0 sectors=50"),
        "{console}"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        original,
        "the image was written"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(disk_file(&s, &disk))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        info["backing-filename"].as_str(),
        base.canonicalize().unwrap().to_str()
    );

    // The image is in use while the disk is based on it.
    let (st, e) = s.json(Method::DELETE, "/v1/images/base", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );

    // The disk holds the writes, the image's bytes elsewhere: checked through the export.
    let (st, exported) = s.call_bytes(Method::GET, "/v1/disks/root/export?format=raw", Vec::new());
    assert_eq!(st, 200);
    let mut want = original.clone();
    want[100 * 512..150 * 512].copy_from_slice(&common::pattern_bytes(9, 100 * 512, 50 * 512));
    assert!(exported == want, "export differs from image + guest writes");
}

#[test]
fn import_boot_write_export_round_trip_and_hostile_imports_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let original = common::pattern_bytes(5, 0, 2 << 20);
    let (st, disk) = s.call_bytes(
        Method::POST,
        "/v1/disks/import?name=imported&format=qcow2",
        original.clone(),
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&disk));
    let disk: Value = serde_json::from_slice(&disk).unwrap();
    assert_eq!(
        (disk["format"].as_str(), disk["size"].as_u64()),
        (Some("qcow2"), Some(2 << 20))
    );

    let body = json!({"name": "vm", "vcpus": 1, "memory": "64MiB",
        "disks": [{"disk": "imported"}],
        "boot": {"kernel": "kiln-probe",
                 "cmdline": "console=ttyS0 probe=blk-verify:0:0:4096:5,blk-write:0:2000:96:11,poweroff"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    action(&s, "vm", json!({"action": "start"}));
    assert!(s.wait_state("vm", "stopped"), "{}", s.console("vm"));
    assert!(
        s.console("vm")
            .contains("PROBE-OK blk-verify blk0 sectors=4096"),
        "{}",
        s.console("vm")
    );
    let mut want = original;
    want[2000 * 512..2096 * 512].copy_from_slice(&common::pattern_bytes(11, 2000 * 512, 96 * 512));
    let (st, raw) = s.call_bytes(Method::GET, "/v1/disks/imported/export", Vec::new());
    assert_eq!(st, 200);
    assert!(raw == want, "raw export differs from what the guest left");

    // A qcow2 export is a valid image with the same content.
    let (st, q) = s.call_bytes(
        Method::GET,
        "/v1/disks/imported/export?format=qcow2",
        Vec::new(),
    );
    assert_eq!(st, 200);
    let qpath = dir.path().join("out.qcow2");
    std::fs::write(&qpath, &q).unwrap();
    let rpath = dir.path().join("want.raw");
    std::fs::write(&rpath, &want).unwrap();
    let ok = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    ok(&["check", qpath.to_str().unwrap()]);
    // The disk file the guest wrote through Kiln's qcow2 driver: consistent, nothing leaked.
    let own = disk_file(&s, &disk);
    ok(&["check", own.to_str().unwrap()]);
    ok(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        qpath.to_str().unwrap(),
        rpath.to_str().unwrap(),
    ]);

    // Hostile images: refused with 400 and a message; nothing is created.
    let before: Vec<_> = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for (name, bytes) in hostile_images(dir.path()) {
        let (st, body) = s.call_bytes(
            Method::POST,
            &format!("/v1/disks/import?name={name}"),
            bytes,
        );
        let e: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(st, 400, "{name}: {e}");
        assert!(
            !e["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{name}: {e}"
        );
        assert_eq!(
            s.json(Method::GET, &format!("/v1/disks/{name}"), Value::Null)
                .0,
            404,
            "{name}"
        );
    }
    let after: Vec<_> = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "{after:?}");
}

/// The hostile corpus: made with qemu-img, then damaged.
fn hostile_images(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let make = |name: &str, backing: Option<&str>| {
        let p = dir.join(name);
        let mut c = std::process::Command::new("qemu-img");
        c.args(["create", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.args(["-u", "-b", b, "-F", "qcow2"]);
        }
        assert!(c.arg(&p).arg("4M").output().unwrap().status.success());
        std::fs::read(p).unwrap()
    };
    let good = make("good.qcow2", None);
    let be32 =
        |v: &mut Vec<u8>, off: usize, x: u32| v[off..off + 4].copy_from_slice(&x.to_be_bytes());
    let be64 =
        |v: &mut Vec<u8>, off: usize, x: u64| v[off..off + 8].copy_from_slice(&x.to_be_bytes());
    let mut out = vec![("truncated", good[..48].to_vec())];
    let mut l1 = good.clone();
    be64(&mut l1, 40, 1 << 40);
    out.push(("l1-past-eof", l1));
    let mut rc = good.clone();
    be32(&mut rc, 96, 7);
    out.push(("refcount-order-7", rc));
    out.push((
        "backing-passwd",
        make("passwd.qcow2", Some("../../etc/passwd")),
    ));
    // qemu-img will not name the image itself as its backing file: name another, then
    // rewrite the name (same length) in the header.
    let mut selfref = make("self.qcow2", Some("selg.qcow2"));
    let at = selfref
        .windows(10)
        .position(|w| w == b"selg.qcow2")
        .unwrap();
    selfref[at..at + 10].copy_from_slice(b"self.qcow2");
    out.push(("self-backing", selfref));
    out
}

#[test]
fn disks_and_images_survive_a_restart_of_kiln_serve() {
    let dir = tempfile::tempdir().unwrap();
    let imgdir = dir.path().join("images");
    std::fs::create_dir(&imgdir).unwrap();
    std::fs::write(imgdir.join("k"), common::pattern_bytes(1, 0, 4096)).unwrap();
    let args = ["--image-dir", imgdir.to_str().unwrap()];
    {
        let s = Server::start_with(dir.path(), &args);
        assert_eq!(
            s.json(
                Method::POST,
                "/v1/disks",
                json!({"name": "a", "size": "1MiB"})
            )
            .0,
            201
        );
        assert_eq!(
            s.json(
                Method::POST,
                "/v1/disks",
                json!({"name": "b", "size": "2MiB", "format": "qcow2"})
            )
            .0,
            201
        );
        assert_eq!(
            s.json(
                Method::POST,
                "/v1/images",
                json!({"name": "k", "kind": "kernel", "path": imgdir.join("k")})
            )
            .0,
            201
        );
        let (st, _) = s.call_bytes(
            Method::POST,
            "/v1/images/upload?name=initrd-1&kind=initrd",
            vec![7; 10000],
        );
        assert_eq!(st, 201);
        let body = json!({"name": "vm", "vcpus": 1, "memory": "64MiB", "disks": [{"disk": "b"}],
            "boot": {"kernel": "kiln-probe", "initrd": "initrd-1", "cmdline": "console=ttyS0 probe=initrd,poweroff"}});
        assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    }
    // What a killed server could leave behind is swept at start.
    let spool = dir.path().join("state/disks/.x.qcow2.abc123.import");
    let tmp = dir.path().join("state/instances/.0000.json.tmp");
    std::fs::write(&spool, b"half an import").unwrap();
    std::fs::write(&tmp, b"{").unwrap();
    let s = Server::start_with(dir.path(), &args);
    assert!(!spool.exists() && !tmp.exists());
    let disks = s.json(Method::GET, "/v1/disks", Value::Null).1;
    let names: Vec<_> = disks
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap(),
                d["size"].as_u64().unwrap(),
                d["attached_to"].as_str(),
            )
        })
        .collect();
    assert_eq!(names, [("a", 1 << 20, None), ("b", 2 << 20, Some("vm"))]);
    let images = s.json(Method::GET, "/v1/images", Value::Null).1;
    let names: Vec<_> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap(), i["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        names,
        [("kiln-probe", names[0].1), ("k", 4096), ("initrd-1", 10000)]
    );
    // The instance boots with the uploaded initrd: the probe sees its bytes.
    action(&s, "vm", json!({"action": "start"}));
    assert!(s.wait_state("vm", "stopped"), "{}", s.console("vm"));
    let fnv = [7u8; 10000].iter().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x01000193)
    });
    let console = s.console("vm");
    assert!(
        console.contains(&format!("size=10000 fnv1a=0x{fnv:08x}")),
        "{console}"
    );
    let (st, e) = s.json(Method::DELETE, "/v1/images/initrd-1", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
}

#[test]
fn an_instance_boots_a_kernel_image_registered_from_an_image_dir() {
    let dir = tempfile::tempdir().unwrap();
    let imgdir = dir.path().join("kernels");
    std::fs::create_dir(&imgdir).unwrap();
    std::fs::copy(common::probe_linux64(), imgdir.join("probe64.elf")).unwrap();
    let s = Server::start_with(dir.path(), &["--image-dir", imgdir.to_str().unwrap()]);
    let (st, img) = s.json(
        Method::POST,
        "/v1/images",
        json!({"name": "probe64", "kind": "kernel", "path": imgdir.join("probe64.elf")}),
    );
    assert_eq!(st, 201, "{img}");
    // A kernel image is not a disk image, and an initrd must be an initrd.
    let (st, e) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "x", "source": {"type": "image", "image": "probe64"}}),
    );
    assert_eq!(st, 400, "{e}");
    let body = json!({"name": "k", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "probe64", "initrd": "probe64", "cmdline": "console=ttyS0 probe=poweroff"}});
    let (st, e) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("boot.initrd"),
        "{e}"
    );
    let body = json!({"name": "k", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "probe64", "cmdline": "console=ttyS0 probe=cmdline,poweroff"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    action(&s, "k", json!({"action": "start"}));
    assert!(s.wait_state("k", "stopped"), "{}", s.console("k"));
    let console = s.console("k");
    assert!(
        console.contains("PROBE-OK cmdline console=ttyS0 probe=cmdline,poweroff"),
        "{console}"
    );
    let (st, e) = s.json(Method::DELETE, "/v1/images/probe64", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("in_use")),
        "{e}"
    );
    assert_eq!(
        s.json(Method::DELETE, "/v1/instances/k", Value::Null).0,
        204
    );
    assert_eq!(
        s.json(Method::DELETE, "/v1/images/probe64", Value::Null).0,
        204
    );
    // Registered in place: deleting the image leaves the file.
    assert!(imgdir.join("probe64.elf").exists());
}

#[test]
fn guest_writes_to_a_fresh_qcow2_disk_leave_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let (st, disk) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "q", "size": "4MiB", "format": "qcow2", "block_size": 4096}),
    );
    assert_eq!(st, 201, "{disk}");
    let body = json!({"name": "vm", "vcpus": 1, "memory": "64MiB", "disks": [{"disk": "q"}],
        "boot": {"kernel": "kiln-probe",
                 "cmdline": "console=ttyS0 probe=blk-info:0,blk-write:0:0:2048:4,blk-flush:0,blk-write:0:7000:50:6,poweroff"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    action(&s, "vm", json!({"action": "start"}));
    assert!(s.wait_state("vm", "stopped"), "{}", s.console("vm"));
    assert!(
        s.console("vm")
            .contains("PROBE-OK blk-write blk0 sectors=50"),
        "{}",
        s.console("vm")
    );
    // The disk's block size is what the guest is told.
    assert!(
        s.console("vm").contains(" blk_size=4096 "),
        "{}",
        s.console("vm")
    );
    // Clusters allocated ahead and not used are given back: no leaks, no errors.
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(disk_file(&s, &disk))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut want = vec![0u8; 4 << 20];
    want[..1 << 20].copy_from_slice(&common::pattern_bytes(4, 0, 1 << 20));
    want[7000 * 512..7050 * 512].copy_from_slice(&common::pattern_bytes(6, 7000 * 512, 50 * 512));
    let (st, raw) = s.call_bytes(Method::GET, "/v1/disks/q/export", Vec::new());
    assert_eq!(st, 200);
    assert!(raw == want, "export differs from what the guest wrote");
}

#[test]
fn a_disk_is_free_again_once_its_export_has_been_read() {
    // An export marks its disk as being read; a client that has the whole body must find the
    // mark gone (the server used to drop it just after the last bytes left: a 409 race).
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    for format in ["raw", "qcow2"] {
        let name = format!("d-{format}");
        let (st, v) = s.json(
            Method::POST,
            "/v1/disks",
            json!({"name": name, "size": "2MiB", "format": format}),
        );
        assert_eq!(st, 201, "{v}");
        for i in 0..25 {
            let snap = format!("s{i}");
            let (st, v) = s.json(
                Method::POST,
                &format!("/v1/disks/{name}/snapshots"),
                json!({ "name": snap }),
            );
            assert_eq!(st, 201, "{v}");
            let (st, bytes) =
                s.call_bytes(Method::GET, &format!("/v1/disks/{name}/export"), Vec::new());
            assert_eq!((st, bytes.len()), (200, 2 << 20));
            let (st, v) = s.json(
                Method::DELETE,
                &format!("/v1/disks/{name}/snapshots/{snap}"),
                Value::Null,
            );
            assert_eq!(st, 204, "round {i} of {format}: {v}");
        }
    }
}
