//! `GET /v1/events`: server-sent events of state changes and operation updates.

mod common;

use common::server::{action, Server};

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Method;
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
            let stream = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            // From the beginning of the log: the create event is there too.
            let req = hyper::Request::get("/v1/events?since=0")
                .header("host", "kiln")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let mut body = resp.into_body();
            // The guest powers itself off: starting → running → stopped.
            sc.spawn(|| action(&s, "ev", json!({"action": "start"})));
            let mut text = String::new();
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while !text.contains("the guest powered off") {
                match tokio::time::timeout_at(end, body.frame()).await {
                    Ok(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            text.push_str(&String::from_utf8_lossy(d));
                        }
                    }
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
