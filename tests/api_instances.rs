//! `kiln serve` over its Unix socket with a real HTTP client: the instance lifecycle of
//! API.md, its refusals, and a restart on the same state directory.

mod common;

use common::server::{action, Server};

use std::time::{Duration, Instant};

use client::Method;
use serde_json::{json, Value};

#[test]
fn instance_lifecycle_over_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let mode = std::fs::metadata(&s.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o660);

    let body = json!({"name": "web-1", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=wait-powerbutton"}});
    let (st, inst) = s.json(Method::POST, "/v1/instances", body.clone());
    assert_eq!(st, 201, "{inst}");
    assert_eq!(inst["state"], "stopped");
    assert_eq!(inst["memory"], 64 << 20);

    let (st, inst) = action(&s, "web-1", json!({"action": "start"}));
    assert_eq!(
        (st, inst["state"].as_str()),
        (200, Some("running")),
        "{inst}"
    );
    assert!(
        s.wait_console("web-1", "PROBE-OK wait-powerbutton armed", 1),
        "{}",
        s.console("web-1")
    );

    // Refusals that fit the state.
    let (st, e) = action(&s, "web-1", json!({"action": "start"}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("running"),
        "{e}"
    );
    let (st, e) = s.json(Method::DELETE, "/v1/instances/web-1", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("invalid_state"))
    );

    // Graceful stop through the power button; start again; reboot; force stop; delete.
    let (st, inst) = action(&s, "web-1", json!({"action": "stop", "timeout_s": 20}));
    assert_eq!(
        (st, inst["state"].as_str()),
        (200, Some("stopped")),
        "{inst}"
    );
    assert!(s.console("web-1").contains("PROBE-OK powerbutton pressed"));
    let (st, _) = action(&s, "web-1", json!({"action": "start"}));
    assert_eq!(st, 200);
    assert!(s.wait_console("web-1", "PROBE-OK wait-powerbutton armed", 2));
    let (st, inst) = action(&s, "web-1", json!({"action": "reboot", "force": true}));
    assert_eq!(
        (st, inst["state"].as_str()),
        (200, Some("running")),
        "{inst}"
    );
    assert!(
        s.wait_console("web-1", "KILN-PROBE v1 ", 3),
        "{}",
        s.console("web-1")
    );
    let (st, inst) = action(&s, "web-1", json!({"action": "stop", "force": true}));
    assert_eq!(
        (st, inst["state"].as_str()),
        (200, Some("stopped")),
        "{inst}"
    );
    let (st, _, _) = s.call(Method::DELETE, "/v1/instances/web-1", "");
    assert_eq!(st, 204);
    let (st, e) = s.json(Method::GET, "/v1/instances/web-1", Value::Null);
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("not_found")));

    // A 202 with an operation to poll, without wait.
    s.json(Method::POST, "/v1/instances", body);
    let (st, op) = s.json(
        Method::POST,
        "/v1/instances/web-1/actions",
        json!({"action": "start"}),
    );
    assert_eq!(st, 202, "{op}");
    let id = op["id"].as_str().unwrap();
    let (st, op) = s.json(
        Method::GET,
        &format!("/v1/operations/{id}/wait?timeout_s=30"),
        Value::Null,
    );
    assert_eq!((st, op["state"].as_str()), (200, Some("succeeded")), "{op}");
}

#[test]
fn bad_requests_get_the_documented_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let base =
        json!({"name": "ok-1", "vcpus": 1, "memory": "64MiB", "boot": {"kernel": "kiln-probe"}});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("vcpus", json!(0)), 400, "invalid_value", "vcpus"),
        (
            with("memory", json!("12XB")),
            400,
            "invalid_value",
            "memory",
        ),
        (with("name", json!("a/b")), 400, "invalid_value", "name"),
        (with("colour", json!("red")), 400, "invalid_value", "colour"),
        (with("vcpus", json!("two")), 400, "invalid_value", "vcpus"),
        (
            with("memory", json!("64TiB")),
            413,
            "insufficient_capacity",
            "memory",
        ),
    ];
    for (body, status, code, word) in cases {
        let (st, e) = s.json(Method::POST, "/v1/instances", body.clone());
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(word),
            "{body}: {e}"
        );
    }
    let (st, _, text) = s.call(Method::POST, "/v1/instances", "{not json");
    assert_eq!(st, 400, "{text}");
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    // The server may answer before it read the whole body: a raw request, so that the
    // client does not trip over the closed connection.
    let mut req = format!(
        "POST /v1/instances HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(big.as_bytes());
    let text = s.call_raw(&req);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"too_large\""), "{text}");
    let (st, e) = s.json(
        Method::POST,
        "/v1/instances/ghost/actions",
        json!({"action": "start"}),
    );
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (st, list) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(
        (st, list.as_array().map(|a| a.len())),
        (200, Some(0)),
        "nothing half-made"
    );
}

#[test]
fn instances_survive_a_restart_of_kiln_serve() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Server::start(dir.path());
        for name in ["one", "two"] {
            let body = json!({"name": name, "vcpus": 1, "memory": "64MiB", "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"}});
            assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
        }
        assert_eq!(action(&s, "one", json!({"action": "start"})).0, 200);
    }
    let s = Server::start(dir.path());
    let (_, list) = s.json(Method::GET, "/v1/instances", Value::Null);
    let mut names: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("one".into(), "stopped".into()),
            ("two".into(), "stopped".into())
        ]
    );
}

#[test]
fn websocket_console_types_into_the_guest_and_reads_the_answer() {
    use client::Message;
    use futures_util::{SinkExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let body = json!({"name": "echo", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=echo,poweroff"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    assert_eq!(action(&s, "echo", json!({"action": "start"})).0, 200);
    assert!(
        s.wait_console("echo", "PROBE-OK echo ready", 1),
        "{}",
        s.console("echo")
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(async {
        let mut ws = s.client().instance_console_stream("echo").await.unwrap();
        ws.send(Message::text("hello kiln\r")).await.unwrap();
        let mut seen = String::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        while !seen.contains("PROBE-ECHO hello kiln") {
            match tokio::time::timeout_at(end, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        ws.send(Message::text("quit\r")).await.unwrap();
        seen
    });
    assert!(seen.contains("PROBE-ECHO hello kiln"), "{seen}");
    // The guest ended its echo and powered off: the instance is stopped.
    let end = Instant::now() + Duration::from_secs(20);
    while s.json(Method::GET, "/v1/instances/echo", Value::Null).1["state"] != "stopped"
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        s.json(Method::GET, "/v1/instances/echo", Value::Null).1["state"],
        "stopped"
    );
}

/// `kiln_vm_pool_ready{memory="<bytes>"}` of `GET /metrics`: VMs ready for guests of `mib`.
fn pool_ready(s: &Server, mib: u64) -> u64 {
    let (st, _, text) = s.call(Method::GET, "/metrics", "");
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("# TYPE kiln_vm_pool_ready gauge"), "{text}");
    let key = format!("kiln_vm_pool_ready{{memory=\"{}\"}} ", mib << 20);
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until exactly `n` VMs for `mib` are ready.
fn pool_becomes(s: &Server, mib: u64, n: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if pool_ready(s, mib) == n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn instances_boot_in_vms_built_ahead_and_the_pool_follows_their_memory_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--vm-pool", "2"]);
    assert!(
        pool_becomes(&s, 256, 2),
        "the pool never filled: {}",
        pool_ready(&s, 256)
    );
    // Fds and threads of the daemon with a full pool: where churn must leave them (sockets
    // left out: this test's own HTTP connections come and go).
    let pid = s.child.id();
    let footprint = || common::fds_and_threads(pid, false);
    let before = footprint();
    // 256 MiB shells first; a 128 MiB instance builds its own VM, then the pool follows it;
    // whichever VM a guest boots in, its memory map is that of its own size (the RAM above
    // 1 MiB ends at its size).
    let sizes = [
        (128, "0x7f00000"),
        (128, "0x7f00000"),
        (256, "0xff00000"),
        (256, "0xff00000"),
        (128, "0x7f00000"),
    ];
    for (i, (mib, above_1m)) in sizes.into_iter().enumerate() {
        let memory = format!("{mib}MiB");
        let name = format!("pooled-{i}");
        let body = json!({"name": name, "vcpus": 1, "memory": memory, "start": true,
            "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=e820,cpus,hlt"}});
        let (st, v) = s.json(Method::POST, "/v1/instances", body);
        assert_eq!(st, 201, "{v}");
        assert!(
            s.wait_console(&name, "PROBE-OK hlt", 1),
            "{}",
            s.console(&name)
        );
        let console = s.console(&name);
        assert!(console.contains("PROBE-OK cpus 1"), "{console}");
        assert!(
            console.contains(&format!("PROBE-E820 base=0x100000 size={above_1m} type=1")),
            "{console}"
        );
        // The pool follows the size of the last start: VMs of the other size are replaced.
        assert!(
            pool_becomes(&s, mib, 2),
            "no VMs for {mib} MiB after a start: {}",
            pool_ready(&s, mib)
        );
        let other = if mib == 128 { 256 } else { 128 };
        assert!(pool_becomes(&s, other, 0), "{other} MiB VMs are kept");
    }
    for i in 0..sizes.len() {
        let (st, v) = s.json(
            Method::DELETE,
            &format!("/v1/instances/pooled-{i}?force=true"),
            Value::Null,
        );
        assert_eq!(st, 204, "{v}");
    }
    // The pool is back to 2 VMs of the last size (128 MiB, as at the start's 256 MiB), its
    // builder threads have ended and no VM of a deleted instance is left.
    assert!(pool_becomes(&s, 128, 2));
    let end = Instant::now() + Duration::from_secs(30);
    let mut after = footprint();
    while after != before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        after = footprint();
    }
    assert_eq!(
        after, before,
        "(fds, threads) with a full pool, before and after the churn"
    );
}
