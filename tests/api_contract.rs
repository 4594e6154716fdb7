//! The OpenAPI document as a contract, checked from outside Kiln with tools from PyPI (in the
//! repository's `.venv`, installed by `tests/python-deps.sh`, which `tests/run` calls), against
//! a real `kiln serve` on TCP with its bearer token:
//! - the served document passes `openapi-spec-validator`;
//! - a Python client generated from it (`openapi-python-client`) runs a whole lifecycle
//!   (`tests/openapi/lifecycle.py`: create, start, wait, console, stop, delete);
//! - schemathesis' response conformance checks, in a bounded run (fixed seed and examples),
//!   find no status, header, content type or body the document does not declare, and no 5xx
//!   (the streams, `GET /v1/events`, the console websocket and disk exports, are left out).
//!
//! Missing tools fail the tests: they never pass by skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::server::Server;

const TOKEN: &str = "contract-token";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool of the repository's Python environment.
fn tool(name: &str) -> PathBuf {
    let path = root().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run tests/python-deps.sh (tests/run does) to install the API contract \
         checks from PyPI",
        path.display()
    );
    path
}

/// Runs `cmd`; panics with its output unless it succeeds. Returns its output.
fn succeeds(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kiln serve` on a Unix socket and on a loopback TCP port with a bearer token; its URL.
fn serve(dir: &Path) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let s = Server::start_with(
        dir,
        &["--listen", &addr, "--token-file", token.to_str().unwrap()],
    );
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < end, "kiln serve does not listen on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
    (s, format!("http://{addr}"))
}

#[test]
fn the_served_document_is_valid_and_a_generated_client_runs_a_lifecycle() {
    let (validator, generator, python) = (
        tool("openapi-spec-validator"),
        tool("openapi-python-client"),
        tool("python"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (s, url) = serve(dir.path());
    let doc = s.block_on(s.client().openapi()).unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();

    succeeds(Command::new(validator).arg(&path));

    let package = dir.path().join("python");
    let out = succeeds(
        Command::new(generator)
            .args(["generate", "--meta", "none", "--path"])
            .arg(&path)
            .arg("--output-path")
            .arg(package.join("kiln_api"))
            .arg("--config")
            .arg(root().join("tests/openapi/client-config.yaml")),
    );
    // Every operation must make it into the client: the generator skips what it cannot model
    // with a warning.
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains("WARNING"),
        "the generator skipped parts of the document:\n{said}"
    );

    let out = succeeds(
        Command::new(python)
            .arg(root().join("tests/openapi/lifecycle.py"))
            .env("PYTHONPATH", &package)
            .env("KILN_URL", &url)
            .env("KILN_TOKEN", TOKEN),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("LIFECYCLE-OK"), "{stdout}");
}

#[test]
fn live_responses_conform_to_the_document() {
    let schemathesis = tool("schemathesis");
    let dir = tempfile::tempdir().unwrap();
    let (_s, url) = serve(dir.path());
    let out = succeeds(
        Command::new(schemathesis)
            .current_dir(dir.path())
            .arg("run")
            .arg(format!("{url}/v1/openapi.json"))
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
                // Streams that never end or may be as long as a disk (a fuzzed disk can be
                // 64 TiB, and schemathesis holds a response whole), and a wait the fuzzer would
                // make long.
                "--exclude-path-regex",
                "/(events|console/stream|export)$",
                "--exclude-path",
                "/v1/operations/{id}/wait",
                "--phases",
                "examples,fuzzing,stateful",
                "--max-examples",
                "10",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--request-timeout",
                "60",
                "--workers",
                "1",
                "--no-color",
            ])
            .env("SCHEMATHESIS_HOOKS", ""),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed"), "{stdout}");
}
