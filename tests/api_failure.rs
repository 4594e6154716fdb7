//! A VM that dies: through `kiln serve`, two instances run at once; the probe command
//! `internal-error` makes KVM itself end one with `KVM_EXIT_INTERNAL_ERROR` (an instruction its
//! emulator cannot handle, on an address with no RAM behind it). That instance ends `failed`
//! with the reason, the other keeps running, and each is stopped, restarted and deleted on its
//! own. `kiln run` reports the same failure with exit status 1.

mod common;

use common::server::{action, Server};

use std::time::{Duration, Instant};

use client::Method;
use serde_json::{json, Value};

/// Types `text` into an instance's serial port through the console websocket and reads its
/// output until `until` has been seen (or 20 s passed); returns what was read.
fn type_into(s: &Server, name: &str, text: &str, until: &str) -> String {
    use client::Message;
    use futures_util::{SinkExt, StreamExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ws = s.client().instance_console_stream(name).await.unwrap();
        ws.send(Message::text(text)).await.unwrap();
        let mut seen = String::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        while !seen.contains(until) {
            match tokio::time::timeout_at(end, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        seen
    })
}

fn get(s: &Server, name: &str) -> Value {
    let (st, inst) = s.json(Method::GET, &format!("/v1/instances/{name}"), Value::Null);
    assert_eq!(st, 200, "{inst}");
    inst
}

/// Polls until the instance is in `state` (at most 20 s); returns it.
fn wait_state(s: &Server, name: &str, state: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let inst = get(s, name);
        if inst["state"] == state || Instant::now() > end {
            return inst;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn create(s: &Server, name: &str, probe: &str) {
    let body = json!({"name": name, "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={probe}")}});
    let (st, inst) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{inst}");
}

fn assert_internal_error(inst: &Value) {
    assert_eq!(inst["state"], "failed", "{inst}");
    let reason = inst["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("KVM internal error") && reason.contains("emulation failure"),
        "the reason names the error: {inst}"
    );
}

#[test]
fn a_failed_instance_does_not_disturb_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &[]);
    create(&s, "steady", "hlt");
    // Runs until told to stop echoing, then executes what KVM cannot emulate.
    create(&s, "doomed", "echo,internal-error");
    for name in ["steady", "doomed"] {
        let (st, inst) = action(&s, name, json!({"action": "start"}));
        assert_eq!(
            (st, inst["state"].as_str()),
            (200, Some("running")),
            "{inst}"
        );
    }
    assert!(s.wait_console("steady", "PROBE-OK hlt", 1));
    assert!(
        s.wait_console("doomed", "PROBE-OK echo ready", 1),
        "{}",
        s.console("doomed")
    );

    // B is made to fail: KVM reports an internal error; B ends `failed` with the reason.
    let seen = type_into(&s, "doomed", "quit\r", "PROBE-OK internal-error");
    assert!(seen.contains("PROBE-OK internal-error"), "{seen}");
    let b = wait_state(&s, "doomed", "failed");
    assert_internal_error(&b);
    assert!(
        !s.console("doomed").contains("still-running"),
        "{}",
        s.console("doomed")
    );
    // Actions that do not fit a failed instance are refused, naming the state.
    let (st, e) = action(&s, "doomed", json!({"action": "stop", "force": true}));
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("failed"),
        "{e}"
    );

    // A is untouched: still running, its console still served.
    let a = get(&s, "steady");
    assert_eq!(
        (a["state"].as_str(), &a["state_reason"]),
        (Some("running"), &Value::Null),
        "{a}"
    );
    let (st, _, console) = s.call(Method::GET, "/v1/instances/steady/console", "");
    assert_eq!(st, 200);
    assert!(console.contains("PROBE-OK hlt"), "{console}");
    assert!(!console.contains("PROBE-FAIL"), "{console}");
    let (_, list) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // A stops on its own; B stays failed.
    let (st, a) = action(&s, "steady", json!({"action": "stop", "force": true}));
    assert_eq!((st, a["state"].as_str()), (200, Some("stopped")), "{a}");
    assert_internal_error(&get(&s, "doomed"));

    // B starts again (failed -> starting -> running) and runs normally.
    let (st, b) = action(&s, "doomed", json!({"action": "start"}));
    assert_eq!((st, b["state"].as_str()), (200, Some("running")), "{b}");
    assert_eq!(b["state_reason"], Value::Null, "{b}");
    assert!(
        s.wait_console("doomed", "PROBE-OK echo ready", 2),
        "{}",
        s.console("doomed")
    );
    let seen = type_into(&s, "doomed", "still here\r", "PROBE-ECHO still here");
    assert!(seen.contains("PROBE-ECHO still here"), "{seen}");

    // Fails again, and a failed instance can be deleted without force.
    type_into(&s, "doomed", "quit\r", "PROBE-OK internal-error");
    assert_internal_error(&wait_state(&s, "doomed", "failed"));
    let (st, _, text) = s.call(Method::DELETE, "/v1/instances/doomed", "");
    assert_eq!(st, 204, "{text}");
    let (st, e) = s.json(Method::GET, "/v1/instances/doomed", Value::Null);
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("not_found")));
    assert_eq!(get(&s, "steady")["state"], "stopped");
}

#[test]
fn an_instance_that_fails_at_boot_fails_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &[]);
    create(&s, "early", "internal-error");
    let (st, _) = action(&s, "early", json!({"action": "start"}));
    // The guest may fail before or after the start operation saw it running; either way the
    // instance ends failed with the reason, and the server goes on serving.
    assert!(st == 200 || st >= 400, "{st}");
    assert_internal_error(&wait_state(&s, "early", "failed"));
    let (st, info) = s.json(Method::GET, "/v1", Value::Null);
    assert_eq!(st, 200, "{info}");
}

#[test]
fn kiln_run_reports_the_internal_error() {
    common::require_kvm();
    let r = common::run_kiln(
        &["run", "--cmdline", "console=ttyS0 probe=internal-error"],
        Duration::from_secs(60),
    );
    assert_eq!(r.status, Some(1), "{}", r.dump());
    assert!(r.has_line("PROBE-OK internal-error"), "{}", r.dump());
    assert!(!r.stdout.contains("still-running"), "{}", r.dump());
    assert!(
        r.stderr.contains("KVM internal error") && r.stderr.contains("emulation failure"),
        "{}",
        r.dump()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.dump());
}
