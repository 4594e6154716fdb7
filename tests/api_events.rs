//! `GET /v1/events`: server-sent events of state changes and operation updates.

mod common;

use common::server::{action, Server};

use std::time::Duration;

use client::Method;
use serde_json::json;

#[test]
fn events_stream_reports_state_changes_and_operations() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let body = json!({"name": "ev", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=poweroff"}});
    let (_, inst) = s.json(Method::POST, "/v1/instances", body);
    let id = inst["id"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = std::thread::scope(|sc| {
        rt.block_on(async {
            // From the beginning of the log: the create event is there too.
            let mut body = s.client().event_stream(Some(0)).await.unwrap();
            assert_eq!(body.status, 200);
            assert_eq!(body.headers["content-type"], "text/event-stream");
            // The guest powers itself off: starting → running → stopped.
            sc.spawn(|| action(&s, "ev", json!({"action": "start"})));
            let mut text = String::new();
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while !text.contains("the guest powered off") {
                match tokio::time::timeout_at(end, body.chunk()).await {
                    Ok(Some(Ok(d))) => text.push_str(&String::from_utf8_lossy(&d)),
                    _ => break,
                }
            }
            text
        })
    });
    let states: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| l.contains(&format!("/v1/instances/{id}")) && l.contains("instance.state"))
        .filter_map(|l| l.split("\"state\":\"").nth(1))
        .map(|l| l.split('"').next().unwrap())
        .collect();
    assert_eq!(
        states,
        ["stopped", "starting", "running", "stopped"],
        "{text}"
    );
    assert!(text.contains("event: operation"), "{text}");
    assert!(text.contains("id: "), "{text}");
}
