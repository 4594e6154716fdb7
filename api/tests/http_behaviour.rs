//! Behaviour common to every route, over a real Unix socket: request ids, the error shape,
//! api-version, body limits, JSON rejections, panics, `GET /v1`, `/metrics`.

mod common;

use client::Method;
use common::{test_router, Server};

async fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::unix(&dir.path().join("kiln.sock"), test_router()).await;
    (dir, server)
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn server_info() {
    let (_dir, server) = server().await;
    let reply = server.get("/v1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("api-version"), Some("1.0"));
    let json = reply.json();
    assert_eq!(json["name"], "kiln");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["api_version"], "1.0");
    assert_eq!(json["host"]["cpus"], 4);
    assert_eq!(json["host"]["memory"], 8u64 << 30);
    assert_eq!(json["features"], serde_json::json!(["test-feature"]));
    server.stop().await;
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let (_dir, server) = server().await;
    let mut seen = std::collections::HashSet::new();
    for (method, path) in [
        (Method::GET, "/v1"),
        (Method::GET, "/metrics"),
        (Method::GET, "/nope"),
        (Method::DELETE, "/v1"),
        (Method::POST, "/test/echo"),
        (Method::GET, "/test/panic"),
    ] {
        let reply = server.send(method.clone(), path, &[], "").await;
        let id = reply
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{method} {path}: no x-request-id"));
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert!(seen.insert(id.to_string()), "ids are unique");
    }
    let reply = server
        .send(Method::GET, "/nope", &[("x-request-id", "abc-123")], "")
        .await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    assert_eq!(reply.json()["error"]["request_id"], "abc-123");
    let reply = server
        .send(Method::GET, "/v1", &[("x-request-id", "bad id!")], "")
        .await;
    assert_ne!(reply.header("x-request-id"), Some("bad id!"));
    server.stop().await;
}

#[tokio::test]
async fn unknown_path_is_404_json() {
    let (_dir, server) = server().await;
    let message = server
        .get("/v1/no/such/thing")
        .await
        .assert_error(404, "not_found");
    assert!(message.contains("/v1/no/such/thing"), "{message}");
    server.stop().await;
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let (_dir, server) = server().await;
    let reply = server.send(Method::DELETE, "/v1", &[], "").await;
    let message = reply.assert_error(405, "method_not_allowed");
    assert!(message.contains("DELETE"), "{message}");
    assert!(reply.header("allow").unwrap().contains("GET"));
    let reply = server.send(Method::GET, "/test/echo", &[], "").await;
    reply.assert_error(405, "method_not_allowed");
    server.stop().await;
}

#[tokio::test]
async fn api_version_header() {
    let (_dir, server) = server().await;
    let reply = server
        .send(Method::GET, "/v1", &[("api-version", "99.0")], "")
        .await;
    let message = reply.assert_error(400, "unsupported_api_version");
    assert!(
        message.contains("99.0") && message.contains("1.0"),
        "{message}"
    );
    assert_eq!(reply.header("api-version"), Some("1.0"));
    // 1.10 is newer than 1.9 and than 1.0: numeric, not textual.
    let reply = server
        .send(Method::GET, "/v1", &[("api-version", "1.10")], "")
        .await;
    reply.assert_error(400, "unsupported_api_version");
    for ok in ["1.0", "1", "0.9"] {
        let reply = server
            .send(Method::GET, "/v1", &[("api-version", ok)], "")
            .await;
        assert_eq!(reply.status, 200, "{ok}");
    }
    let reply = server
        .send(Method::GET, "/v1", &[("api-version", "latest")], "")
        .await;
    reply.assert_error(400, "bad_request");
    server.stop().await;
}

#[tokio::test]
async fn json_bodies() {
    let (_dir, server) = server().await;
    let post = |body: Vec<u8>, headers: Vec<(&'static str, &'static str)>| {
        let server = &server;
        async move {
            server
                .send(Method::POST, "/test/echo", &headers, body)
                .await
        }
    };

    let reply = post(br#"{"name":"a","vcpus":2}"#.to_vec(), vec![JSON]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["vcpus"], 2);

    let mut big = br#"{"name":""#.to_vec();
    big.resize(api::JSON_BODY_LIMIT + 1, b'a');
    big.extend(br#"","vcpus":1}"#);
    post(big, vec![JSON]).await.assert_error(413, "too_large");

    let message = post(br#"{"name":"a","vcpus":"#.to_vec(), vec![JSON])
        .await
        .assert_error(400, "bad_request");
    assert!(message.contains("malformed JSON"), "{message}");

    let message = post(
        br#"{"name":"a","vcpus":1,"colour":"red"}"#.to_vec(),
        vec![JSON],
    )
    .await
    .assert_error(400, "invalid_value");
    assert!(message.contains("colour"), "{message}");

    let message = post(br#"{"name":"a","vcpus":"two"}"#.to_vec(), vec![JSON])
        .await
        .assert_error(400, "invalid_value");
    assert!(message.contains("vcpus"), "{message}");

    let message = post(br#"{"name":"a","vcpus":4294967296}"#.to_vec(), vec![JSON])
        .await
        .assert_error(400, "invalid_value");
    assert!(message.contains("vcpus"), "{message}");

    post(
        br#"{"name":"a","vcpus":1}"#.to_vec(),
        vec![("content-type", "text/plain")],
    )
    .await
    .assert_error(415, "unsupported_media_type");
    // What `curl -d` sends: no Content-Type, or its form default; both are read as JSON.
    for headers in [
        vec![],
        vec![("content-type", "application/x-www-form-urlencoded")],
    ] {
        let reply = post(br#"{"name":"a","vcpus":1}"#.to_vec(), headers).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    server.stop().await;
}

#[tokio::test]
async fn a_panic_is_500_internal_and_the_server_goes_on() {
    let (_dir, server) = server().await;
    let reply = server.get("/test/panic").await;
    let message = reply.assert_error(500, "internal");
    assert!(
        !reply.text().contains("secret panic text"),
        "{}",
        reply.text()
    );
    assert!(!message.contains("panicked"), "{message}");
    assert_eq!(server.get("/v1").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_requests() {
    let (_dir, server) = server().await;
    server.get("/v1").await;
    server.get("/v1").await;
    server.get("/nope").await;
    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = reply.text();
    assert!(
        text.contains(r#"kiln_api_requests_total{method="GET",route="/v1",status="200"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kiln_api_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kiln_api_request_duration_seconds_count{method="GET",route="/v1"} 2"#),
        "{text}"
    );
    server.stop().await;
}
