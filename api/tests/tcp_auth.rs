//! The TCP listener: no token, no listener; every request needs the bearer token.

mod common;

use std::io::Write;

use api::{ListenError, TcpServer};
use client::Method;
use common::{test_router, Server};

#[tokio::test]
async fn refuses_to_start_without_a_usable_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:0".parse().unwrap();

    let missing = dir.path().join("missing");
    let err = TcpServer::bind(addr, &missing).await.unwrap_err();
    assert!(matches!(err, ListenError::Token(_)), "{err:?}");
    assert!(
        err.to_string().contains("refusing to listen on TCP"),
        "{err}"
    );

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let err = TcpServer::bind(addr, &empty).await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}

async fn server_with_token(token: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "{token}").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let server = Server::tcp(&path, test_router()).await;
    (dir, server)
}

#[tokio::test]
async fn requests_need_the_right_token() {
    let (_dir, server) = server_with_token("correct-horse-battery").await;

    let reply = server.get("/v1").await;
    let message = reply.assert_error(401, "unauthorized");
    assert!(message.contains("Authorization"), "{message}");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));

    let reply = server
        .send(Method::GET, "/v1", &[("authorization", "Bearer wrong")], "")
        .await;
    reply.assert_error(401, "unauthorized");

    // Unknown paths are not revealed without the token either.
    let reply = server.get("/no/such/path").await;
    reply.assert_error(401, "unauthorized");

    let reply = server
        .send(
            Method::GET,
            "/v1",
            &[("authorization", "Bearer correct-horse-battery")],
            "",
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["name"], "kiln");
    assert!(reply.header("x-request-id").is_some());
    server.stop().await;
}

#[tokio::test]
async fn unauthorized_before_the_body_is_read() {
    let (_dir, server) = server_with_token("t0ken").await;
    // Over the body limit and malformed: without the token it is still a 401, not 413 or 400.
    let body = vec![b'{'; api::JSON_BODY_LIMIT + 10];
    let reply = server
        .send(
            Method::POST,
            "/test/echo",
            &[("content-type", "application/json")],
            body,
        )
        .await;
    reply.assert_error(401, "unauthorized");
    // With the token, the same request reaches the extractor.
    let reply = server
        .send(
            Method::POST,
            "/test/echo",
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer t0ken"),
            ],
            vec![b'{'; api::JSON_BODY_LIMIT + 10],
        )
        .await;
    reply.assert_error(413, "too_large");
    server.stop().await;
}

#[tokio::test]
async fn incoming_request_id_is_echoed_on_401() {
    let (_dir, server) = server_with_token("t").await;
    let reply = server
        .send(Method::GET, "/v1", &[("x-request-id", "client-id-1")], "")
        .await;
    reply.assert_error(401, "unauthorized");
    assert_eq!(reply.header("x-request-id"), Some("client-id-1"));
    server.stop().await;
}
