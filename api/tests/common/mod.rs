//! Test helpers: a real server on a real socket, and the client crate's raw layer for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use api::{AppState, HostInfo, Metrics, ServerInfo, TcpServer, UnixServer};
use axum::Router;
use bytes::Bytes;
use client::{Client, Endpoint, HeaderMap, Method, StatusCode};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The state every test server uses.
pub fn state() -> AppState {
    AppState::new(
        ServerInfo {
            host: HostInfo {
                cpus: 4,
                memory: 8 << 30,
            },
            features: vec!["test-feature".to_string()],
        },
        Metrics::new(),
    )
}

/// The API router plus test-only routes: `POST /test/echo` (JSON echo) and `GET /test/panic`.
pub fn test_router() -> Router {
    #[derive(serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Echo {
        name: String,
        vcpus: u32,
    }
    async fn echo(api::ApiJson(body): api::ApiJson<Echo>) -> api::ApiJson<Echo> {
        api::ApiJson(body)
    }
    async fn panics() -> &'static str {
        panic!("secret panic text")
    }
    api::api_routes()
        .route(Method::POST, "/test/echo", echo)
        .route(Method::GET, "/test/panic", panics)
        .into_router(state())
}

/// Where a test server listens.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running server; stops (and waits for it) on [`Server::stop`].
pub struct Server {
    pub target: Target,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), api::ListenError>>>,
}

impl Server {
    /// Serves `router` on a Unix socket at `path`.
    pub async fn unix(path: &Path, router: Router) -> Server {
        let server = UnixServer::bind(path).await.expect("bind unix socket");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(router, async move {
            let _ = stopped.await;
        }));
        Server {
            target: Target::Unix(path.to_path_buf()),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Serves `router` on 127.0.0.1 (a free port) with the token in `token_file`.
    pub async fn tcp(token_file: &Path, router: Router) -> Server {
        let server = TcpServer::bind("127.0.0.1:0".parse().unwrap(), token_file)
            .await
            .expect("bind tcp");
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(router, async move {
            let _ = stopped.await;
        }));
        Server {
            target: Target::Tcp(addr),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks the server to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("server ended cleanly");
    }

    /// A request with no body and no extra headers.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// A request to this server.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        send(&self.target, method, path, headers, body.into()).await
    }
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts the error shape of API.md with `status` and `code`; returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{}",
            self.text()
        );
        let json = self.json();
        let error = json["error"].as_object().expect("an `error` object");
        assert_eq!(error.len(), 3, "exactly code, message, request_id: {json}");
        assert_eq!(error["code"], code, "{json}");
        let request_id = error["request_id"].as_str().expect("request_id");
        assert_eq!(
            Some(request_id),
            self.header("x-request-id"),
            "request_id in body and header agree"
        );
        error["message"].as_str().expect("message").to_string()
    }
}

/// One request to `target` (over TCP without a token: the test names its own headers).
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let endpoint = match target {
        Target::Unix(path) => Endpoint::Unix(path.clone()),
        Target::Tcp(addr) => Endpoint::Tcp {
            addr: addr.to_string(),
            token: None,
        },
    };
    let mut request = Client::new(endpoint).request(method, path);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let reply = request
        .raw_body(client::body::bytes(body))
        .send()
        .await
        .expect("request");
    Reply {
        status: reply.status,
        headers: reply.headers,
        body: reply.body,
    }
}
