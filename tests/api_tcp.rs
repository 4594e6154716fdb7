//! `kiln serve --listen ADDR:PORT --token-file FILE`: the API on TCP (loopback here), every
//! request with `Authorization: Bearer <token>`; none without a token file.

mod common;

use common::server::Server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{Client, Endpoint, HeaderMap, Method};
use serde_json::Value;

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request over TCP, with `authorization` if given; status, headers and body text.
fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, HeaderMap, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // No token of the client's own: the test names the header it sends, or none.
        let client = Client::new(Endpoint::Tcp {
            addr: addr.to_string(),
            token: None,
        });
        let mut req = client.request(method, path);
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let reply = req
            .body("application/json", client::body::bytes(body.to_string()))
            .send()
            .await
            .unwrap();
        (reply.status.as_u16(), reply.headers.clone(), reply.text())
    })
}

/// Waits until something accepts on `addr` (at most 10 s).
fn wait_listening(addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks a 401 in the error shape of API.md, with a request id matching the header.
fn assert_unauthorized(status: u16, headers: &HeaderMap, text: &str) {
    assert_eq!(status, 401, "{text}");
    let e: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(e["error"]["code"], "unauthorized", "{e}");
    assert!(
        !e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{e}"
    );
    let id = headers
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap();
    assert_eq!(e["error"]["request_id"], id, "{e}");
    assert_eq!(e.as_object().map(|o| o.len()), Some(1), "only `error`: {e}");
}

#[test]
fn tcp_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "k1ln-t0ken-for-tests";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let s = Server::start_with(
        dir.path(),
        &[
            "--listen",
            &addr.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    wait_listening(addr);

    // No Authorization header: 401 before anything else, whatever the path or body.
    let (st, h, text) = call(addr, Method::GET, "/v1/instances", None, "");
    assert_unauthorized(st, &h, &text);
    let (st, h, text) = call(addr, Method::POST, "/v1/instances", None, "{not json");
    assert_unauthorized(st, &h, &text);
    let (st, h, text) = call(addr, Method::GET, "/no/such/path", None, "");
    assert_unauthorized(st, &h, &text);

    // Wrong tokens, other schemes, the token without a scheme.
    for bad in [
        "Bearer wrong",
        &format!("Bearer {token}x"),
        &format!("Basic {token}"),
        token,
        "Bearer ",
    ] {
        let (st, h, text) = call(addr, Method::GET, "/v1/instances", Some(bad), "");
        assert_unauthorized(st, &h, &text);
    }

    // The right token: served as on the Unix socket.
    let auth = format!("Bearer {token}");
    let (st, h, text) = call(addr, Method::GET, "/v1/instances", Some(&auth), "");
    assert_eq!(st, 200, "{text}");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        Value::Array(vec![])
    );
    let (st, _, text) = call(addr, Method::GET, "/v1", Some(&auth), "");
    assert_eq!(st, 200, "{text}");
    let (st, _, text) = call(addr, Method::GET, "/v1/nope", Some(&auth), "");
    assert_eq!(
        st, 404,
        "authenticated requests get the usual errors: {text}"
    );

    // The Unix socket needs no token.
    let (st, _) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(st, 200);
}

/// What `kiln serve` printed and how it ended, when it refuses to start.
fn refused(dir: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    common::require_kvm();
    let socket = dir.join("kiln.sock");
    let mut args = vec!["serve", "--socket", socket.to_str().unwrap()];
    let state = dir.join("state");
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let r = common::run_kiln(&args, Duration::from_secs(20));
    assert!(
        !r.timed_out,
        "kiln serve must refuse, not serve: {}",
        r.dump()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.dump());
    assert!(
        !socket.exists(),
        "nothing may be left listening: {}",
        r.dump()
    );
    (r.status, r.stderr)
}

#[test]
fn tcp_without_a_usable_token_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());

    // No --token-file at all: a usage error (status 2) in one line that says what to add.
    let (status, stderr) = refused(dir.path(), &["--listen", &addr]);
    assert_eq!(status, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("kiln: "), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");

    // A token file that is missing or empty.
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (file, why) in [(&missing, "cannot read token file"), (&empty, "is empty")] {
        let (status, stderr) = refused(
            dir.path(),
            &["--listen", &addr, "--token-file", file.to_str().unwrap()],
        );
        assert_eq!(status, Some(1), "{stderr}");
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
        assert!(
            lines[0].contains("refusing to listen on TCP") && lines[0].contains(why),
            "{stderr}"
        );
    }
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "nothing listens on {addr}"
    );
}

/// Writes `request` to `addr` as it is and returns the whole response text.
fn raw(addr: SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn two_authorization_headers_are_refused_even_when_one_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let token = "k1ln-t0ken-two";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _s = Server::start_with(
        dir.path(),
        &[
            "--listen",
            &addr.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    wait_listening(addr);
    for (first, second) in [
        (format!("Bearer {token}"), "Bearer wrong".to_string()),
        ("Bearer wrong".to_string(), format!("Bearer {token}")),
        (format!("Bearer {token}"), format!("Bearer {token}")),
    ] {
        let reply = raw(
            addr,
            &format!(
                "GET /v1/instances HTTP/1.1\r\nHost: kiln\r\nAuthorization: {first}\r\n\
                 Authorization: {second}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
        assert!(reply.contains("more than one"), "{reply}");
    }
    let one = raw(
        addr,
        &format!(
            "GET /v1/instances HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
}

/// Raises this process's soft open-files limit to the hard one (the flood opens many).
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_flood_of_half_open_tcp_requests_is_bounded_and_the_unix_socket_keeps_answering() {
    use std::io::{Read, Write};
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let token = "k1ln-fl00d";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let s = Server::start_with(
        dir.path(),
        &[
            "--listen",
            &addr.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--max-connections",
            "64",
            "--header-timeout",
            "3",
            "--body-timeout",
            "2",
        ],
    );
    wait_listening(addr);
    let pid = s.child.id();
    let before = fd_count(pid);

    // 1 100 connections that never finish their headers.
    let mut flood = Vec::new();
    for _ in 0..1100 {
        let Ok(mut c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        else {
            continue;
        };
        let _ = c.write_all(b"GET /v1/instances HTTP/1.1\r\nHost: kiln\r\n");
        flood.push(c);
    }
    assert!(flood.len() >= 1000, "{} connected", flood.len());
    let during = fd_count(pid);
    assert!(
        during <= before + 64 + 8,
        "the daemon holds {during} fds under the flood (it began with {before})"
    );

    // The operator's socket answers at once, and a VM still starts.
    let t = Instant::now();
    let (st, _) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(st, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances",
        serde_json::json!({"name": "calm", "vcpus": 1, "memory": "32MiB", "start": true,
            "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"}}),
    );
    assert_eq!(st, 201, "{v}");
    assert!(s.wait_state("calm", "running"));

    // The first half-open requests are closed once their header time is up.
    let mut closed = 0;
    for c in flood.iter_mut().take(64) {
        c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut b = [0u8; 256];
        // EOF, an answer (408) or a reset end it; only a read that times out does not.
        match c.read(&mut b) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            _ => closed += 1,
        }
    }
    assert_eq!(closed, 64);
    drop(flood);
    let (st, _, _) = s.call(Method::DELETE, "/v1/instances/calm?force=true", "");
    assert_eq!(st, 204);
    assert!(
        {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if fd_count(pid) <= before + 2 || Instant::now() > end {
                    break fd_count(pid) <= before + 2;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        },
        "fds after the flood: {} (began with {before})",
        fd_count(pid)
    );

    // A body that stops coming: the request fails after the body timeout, no thread held.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "POST /v1/disks HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\""
    )
    .unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}: {}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_token_file_everyone_may_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "k1ln-open-t0ken\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let out = common::kiln()
        .args(["serve", "--socket"])
        .arg(dir.path().join("k.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--listen",
            &addr,
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("readable by everyone"), "{stderr}");
    assert!(!dir.path().join("k.sock").exists());
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (openssl CLI): (cert, key).
fn self_signed(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// One request over TLS, trusting only `ca`; the response text, or the TLS error.
fn tls_request(addr: SocketAddr, ca: &std::path::Path, request: &str) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
}

#[test]
fn tcp_with_tls_serves_a_client_that_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let token = "k1ln-tls-t0ken";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (cert, key) = self_signed(dir.path(), "server");
    let (other, _) = self_signed(dir.path(), "other");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _s = Server::start_with(
        dir.path(),
        &[
            "--listen",
            &addr.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    wait_listening(addr);
    let get = |auth: &str| {
        format!("GET /v1/instances HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
    };
    let ok = tls_request(
        addr,
        &cert,
        &get(&format!("Authorization: Bearer {token}\r\n")),
    )
    .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let no_token = tls_request(addr, &cert, &get("")).unwrap();
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    // A client that trusts another certificate refuses the server.
    let err = tls_request(addr, &other, &get("")).unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP gets no answer in the clear.
    let plain = raw(addr, &get(&format!("Authorization: Bearer {token}\r\n")));
    assert!(!plain.contains("HTTP/1.1 200"), "{plain}");
}
