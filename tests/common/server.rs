//! `kiln serve` as a child process, and the client crate for it over its Unix socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use client::{Client, HeaderMap, Method};
use serde_json::Value;

/// A running `kiln serve`; SIGTERM on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Drives the client's connections while the test's thread waits on a call.
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Server {
    /// `kiln serve` on `dir/kiln.sock` with state in `dir/state`.
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, &[])
    }

    /// The same, with more `kiln serve` arguments.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        super::require_kvm();
        let socket = dir.join("kiln.sock");
        let child = super::kiln()
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The socket file appears just before the server accepts: wait for a connection.
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        Server {
            child,
            client: Client::unix(&socket),
            socket,
            state_dir: dir.join("state"),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// A client of this server, for a test's own runtime.
    pub fn client(&self) -> Client {
        Client::unix(&self.socket)
    }

    /// Runs a future of the test on the harness's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// One request; returns status, headers and body bytes.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, HeaderMap, Vec<u8>) {
        let mut req = self.client.request(method, path);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let reply = self
            .block_on(req.body(content_type, client::body::bytes(body)).send())
            .unwrap();
        (reply.status.as_u16(), reply.headers, reply.body.to_vec())
    }

    /// One JSON request; returns status, headers and body text.
    pub fn call(&self, method: Method, path: &str, body: &str) -> (u16, HeaderMap, String) {
        let (status, headers, bytes) = self.request(
            method,
            path,
            "application/json",
            &[],
            body.as_bytes().to_vec(),
        );
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// One request with a byte body (`application/octet-stream`); returns status and body.
    pub fn call_bytes(&self, method: Method, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let (status, _, bytes) = self.request(method, path, "application/octet-stream", &[], body);
        (status, bytes)
    }

    /// Writes `request` (a whole HTTP/1 request) as it is, ignoring a server that stops
    /// reading early (as for a body over the limit), and returns the response text.
    pub fn call_raw(&self, request: &[u8]) -> String {
        let out = self.block_on(self.client.exchange_raw(request)).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A JSON request with extra headers; returns status, headers and the parsed body.
    pub fn json_with(
        &self,
        method: Method,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        let (status, headers, bytes) = self.request(
            method,
            path,
            "application/json",
            headers,
            body.to_string().into_bytes(),
        );
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Waits until the instance is in `state`.
    pub fn wait_state(&self, name: &str, state: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            let (_, v) = self.json(Method::GET, &format!("/v1/instances/{name}"), Value::Null);
            if v["state"] == state {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn json(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let (status, headers, text) = self.call(method, path, &body.to_string());
        assert!(
            headers.contains_key("x-request-id"),
            "{path}: no x-request-id"
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn console(&self, name: &str) -> String {
        self.call(Method::GET, &format!("/v1/instances/{name}/console"), "")
            .2
    }

    pub fn wait_console(&self, name: &str, what: &str, n: usize) -> bool {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if self.console(name).matches(what).count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An action with `?wait=true`.
pub fn action(s: &Server, name: &str, a: Value) -> (u16, Value) {
    s.json(
        Method::POST,
        &format!("/v1/instances/{name}/actions?wait=true"),
        a,
    )
}
