//! The Unix socket listener: mode, stale sockets, live sockets, files that are not sockets.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use api::{ListenError, UnixServer};
use common::{test_router, Server};

#[tokio::test]
async fn socket_has_mode_0660_and_parent_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/kiln/kiln.sock");
    let server = Server::unix(&path, test_router()).await;
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(server.get("/v1").await.status, 200);
    server.stop().await;
    assert!(!path.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sock");
    // A socket file nobody listens on any more (a crashed server's).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let server = Server::unix(&path, test_router()).await;
    assert_eq!(server.get("/v1").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn live_socket_is_refused_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sock");
    let server = Server::unix(&path, test_router()).await;
    let err = UnixServer::bind(&path).await.unwrap_err();
    assert!(matches!(err, ListenError::AlreadyRunning(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("another kiln serve is running on {}", path.display())
    );
    assert_eq!(server.get("/v1").await.status, 200, "first server unharmed");
    server.stop().await;
}

#[tokio::test]
async fn regular_file_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sock");
    std::fs::write(&path, b"precious data").unwrap();
    let err = UnixServer::bind(&path).await.unwrap_err();
    assert!(matches!(err, ListenError::NotASocket(_)), "{err:?}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious data");
}

#[tokio::test]
async fn symlink_and_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = UnixServer::bind(&link).await.unwrap_err();
    assert!(matches!(err, ListenError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(std::fs::symlink_metadata(&link).is_ok());

    let sub = dir.path().join("a-dir");
    std::fs::create_dir(&sub).unwrap();
    let err = UnixServer::bind(&sub).await.unwrap_err();
    assert!(matches!(err, ListenError::NotASocket(_)), "{err:?}");
    assert!(sub.is_dir());
}

#[tokio::test]
async fn socket_replaced_by_another_is_not_removed_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sock");
    let server = Server::unix(&path, test_router()).await;
    // Someone removes our socket and puts their own file there.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"not ours").unwrap();
    server.stop().await;
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
}
