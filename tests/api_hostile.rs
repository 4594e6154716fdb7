//! `kiln serve` against a hostile guest and hostile clients (issue 10): nothing a guest or a
//! client does grows the daemon's fds or threads for good; a guest that resets in a loop is
//! backed off; a start racing a forced delete leaves no VM behind.

mod common;

use common::server::{action, Server};

use std::time::{Duration, Instant};

use client::Method;
use serde_json::{json, Value};

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Polls `f` until it is true, at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(s: &Server, name: &str, probe: &str, start: bool) -> Value {
    let body = json!({"name": name, "vcpus": 1, "memory": "32MiB", "start": start,
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={probe}")}});
    let (st, v) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{v}");
    v
}

fn get(s: &Server, name: &str) -> Value {
    s.json(Method::GET, &format!("/v1/instances/{name}"), Value::Null)
        .1
}

#[test]
fn lifecycles_and_a_rebooting_guest_leave_no_fds_or_threads_behind() {
    let lifecycles: usize = std::env::var("KILN_HOSTILE_LIFECYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let pid = s.child.id();
    // Before any client connection (idle ones close after the header timeout, and the end is
    // measured once they have).
    std::thread::sleep(Duration::from_millis(300));
    let before = common::fds_and_threads(pid, true);

    // A guest that resets itself in a loop, for the whole run.
    let t0 = Instant::now();
    create(&s, "looper", "reboot", true);
    for i in 0..lifecycles {
        let name = format!("life-{i}");
        create(&s, &name, "hlt", true);
        assert!(s.wait_state(&name, "running"), "{}", get(&s, &name));
        let (st, v) = action(&s, &name, json!({"action": "stop", "force": true}));
        assert_eq!((st, v["state"].as_str()), (200, Some("stopped")), "{v}");
        let (st, _, body) = s.call(Method::DELETE, &format!("/v1/instances/{name}"), "");
        assert_eq!(st, 204, "{body}");
    }
    // The looping guest keeps going for 20 s at least.
    while t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let looper = get(&s, "looper");
    let reboots = s.console("looper").matches("PROBE-OK reboot").count();
    // Unchecked, the probe resets ~30 times a second; backed off, a dozen times in 20 s.
    assert!(
        (6..30).contains(&reboots),
        "{reboots} reboots in {:?}",
        t0.elapsed()
    );
    let reason = looper["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("back-off"), "{looper}");
    // The back-off is an event too.
    let events = s.block_on(async {
        let mut stream = s.client().event_stream(Some(0)).await.unwrap();
        let mut seen = String::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while !seen.contains("back-off") {
            match tokio::time::timeout_at(end, stream.chunk()).await {
                Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
                _ => break,
            }
        }
        seen
    });
    assert!(events.contains("back-off"), "no back-off event");
    // Deleting it does not wait for the back-off to end.
    let t = Instant::now();
    let (st, _, body) = s.call(Method::DELETE, "/v1/instances/looper?force=true", "");
    assert_eq!(st, 204, "{body}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Idle blocking threads go after their keep-alive: the daemon ends where it began.
    let mut after = (0, 0);
    let settled = eventually(Duration::from_secs(30), || {
        after = common::fds_and_threads(pid, true);
        after == before
    });
    assert!(
        settled,
        "(fds, threads) before {before:?}, after {lifecycles} lifecycles and a rebooting guest \
         {after:?}; threads: {:?}",
        thread_names(pid)
    );
}

#[test]
fn a_start_racing_a_forced_delete_leaves_no_vm_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let pid = s.child.id();
    for i in 0..30 {
        let name = format!("ghost-{i}");
        create(&s, &name, "hlt", false);
        let (a, b) = (s.client(), s.client());
        let path = format!("/v1/instances/{name}");
        let start = format!("{path}/actions");
        s.block_on(async {
            let start = a
                .request(Method::POST, start)
                .json(&json!({"action": "start"}))
                .send();
            // The delete lands at a different point of the start each time.
            let delay = Duration::from_micros(700 * (i % 15));
            let delete = async {
                tokio::time::sleep(delay).await;
                b.request(Method::DELETE, format!("{path}?force=true"))
                    .send()
                    .await
            };
            let (_, d) = tokio::join!(start, delete);
            let d = d.unwrap();
            assert_eq!(d.status.as_u16(), 204, "{}", d.text());
        });
        let (st, _) = s.json(Method::GET, &path, Value::Null);
        assert_eq!(st, 404);
    }
    let vm_threads = || {
        thread_names(pid)
            .into_iter()
            .filter(|n| n.starts_with("kiln-vm") || n.starts_with("kiln-vcpu"))
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), || vm_threads().is_empty()),
        "VMs of deleted instances still run: {:?}",
        vm_threads()
    );
    let (_, list) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

/// The files of a state subdirectory, sorted.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_kill_during_an_import_leaves_nothing_a_restart_does_not_sweep() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    let (st, disk) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "kept", "size": "1MiB"}),
    );
    assert_eq!(st, 201, "{disk}");
    let disks = s.state_dir.join("disks");
    let images = s.state_dir.join("images");
    let kept = files(&disks);

    // An import and an upload, half-sent, when the daemon is killed.
    let mut streams = Vec::new();
    for path in [
        "/v1/disks/import?name=half&format=raw",
        "/v1/images/upload?name=halfimg&kind=disk",
    ] {
        let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {}\r\n\r\n",
            64 << 20
        )
        .unwrap();
        c.write_all(&vec![0x5a; 4 << 20]).unwrap();
        streams.push(c);
    }
    assert!(
        eventually(Duration::from_secs(10), || files(&disks).len() > kept.len()),
        "the import made no file: {:?}",
        files(&disks)
    );
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(streams);
    // Files no definition names, as a copy or an import killed later would leave them.
    for f in [
        disks.join("0badc0de-0000-4000-8000-000000000001.raw"),
        disks.join("0badc0de-0000-4000-8000-000000000002.qcow2"),
        images.join("0badc0de-0000-4000-8000-000000000003.img"),
    ] {
        std::fs::write(f, b"torn").unwrap();
    }
    drop(s);

    let s = Server::start(dir.path());
    let (st, list) = s.json(Method::GET, "/v1/disks", Value::Null);
    assert_eq!(st, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(
        files(&disks),
        kept,
        "the state directory holds what definitions name"
    );
    let only_defs = files(&images).iter().all(|f| f.ends_with(".json"));
    assert!(only_defs, "{:?}", files(&images));
}

#[test]
fn a_second_daemon_on_one_state_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = common::kiln()
        .args(["serve", "--socket"])
        .arg(dir.path().join("other.sock"))
        .arg("--state-dir")
        .arg(&s.state_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another kiln serve")
            && stderr.contains(&s.child.id().to_string()),
        "{stderr}"
    );
    assert!(!dir.path().join("other.sock").exists());
    // The first one still answers.
    let (st, _) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(st, 200);
}

/// Asserts a 400 `invalid_value` whose message names `field`.
fn assert_invalid(st: u16, v: &Value, field: &str) {
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_value", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(field), "the message names {field}: {v}");
}

#[test]
fn definitions_that_cannot_start_and_disks_over_the_limit_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let instance = |cmdline: &str, tap: Option<&str>| {
        let mut body = json!({"name": "bad", "vcpus": 1, "memory": "32MiB",
            "boot": {"kernel": "kiln-probe", "cmdline": cmdline}});
        if let Some(tap) = tap {
            body["network_interfaces"] = json!([{"host_tap": tap}]);
        }
        s.json(Method::POST, "/v1/instances", body)
    };
    let (st, v) = instance("console=ttyS0\u{0}probe=hlt", None);
    assert_invalid(st, &v, "boot.cmdline");
    let (st, v) = instance(&"x".repeat(100_000), None);
    assert_invalid(st, &v, "boot.cmdline");
    for tap in ["lo", "..", "%d", "tap%d", "a/b", ""] {
        let (st, v) = instance("console=ttyS0", Some(tap));
        assert_invalid(st, &v, "network_interfaces[0].host_tap");
    }
    // Nothing was made.
    let (_, list) = s.json(Method::GET, "/v1/instances", Value::Null);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // A disk of 64 TiB is either made or refused as more than the host holds, never a 500;
    // past 64 TiB it is refused as invalid.
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "huge", "size": "64TiB"}),
    );
    assert!(st == 201 || st == 413, "{st} {v}");
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "huger", "size": "100TiB"}),
    );
    assert_invalid(st, &v, "size");
    // A qcow2 stream whose header claims 100 TiB: refused from its header.
    let mut header = vec![0u8; 4096];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&16u32.to_be_bytes());
    header[24..32].copy_from_slice(&(100u64 << 40).to_be_bytes());
    let (st, _, body) = s.request(
        Method::POST,
        "/v1/disks/import?name=bomb&format=qcow2",
        "application/octet-stream",
        &[],
        header,
    );
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_invalid(st, &v, "64 TiB");
    let leftovers: Vec<_> = std::fs::read_dir(s.state_dir.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".json"))
        .collect();
    assert!(leftovers.len() <= 1, "{leftovers:?}");
}

#[test]
fn sigterm_gives_listening_guests_the_power_button_and_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let socket = dir.path().join("k.sock");
    common::require_kvm();
    let mut child = common::kiln()
        .args(["serve", "--shutdown-timeout", "20", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("KILN_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = client::Client::unix(&socket);
    let console = |name: &str| {
        rt.block_on(
            c.request(Method::GET, format!("/v1/instances/{name}/console"))
                .send(),
        )
        .unwrap()
        .text()
    };
    for (name, probe) in [("polite", "wait-powerbutton"), ("deaf", "hlt")] {
        let body = json!({"name": name, "vcpus": 1, "memory": "32MiB", "start": true,
            "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={probe}")}});
        let r = rt
            .block_on(c.request(Method::POST, "/v1/instances").json(&body).send())
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{}", r.text());
    }
    assert!(eventually(Duration::from_secs(20), || console("polite")
        .contains("PROBE-OK wait-powerbutton armed")));
    assert!(eventually(Duration::from_secs(20), || console("deaf")
        .contains("PROBE-OK hlt")));

    let t = Instant::now();
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("1 guest(s) powered off on the power button, 1 stopped at once"),
        "{text}"
    );
    // The guest that listens was not made to wait for the whole grace period.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn hundreds_of_idle_event_and_console_clients_hold_no_thread_and_slow_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let pid = s.child.id();
    create(&s, "chatty", "hlt", true);
    assert!(s.wait_state("chatty", "running"));
    let (_, threads_before) = common::fds_and_threads(pid, true);
    let c = s.client();
    let (events, consoles) = s.block_on(async {
        let mut events = Vec::new();
        for _ in 0..400 {
            events.push(c.event_stream(None).await.unwrap());
        }
        let mut consoles = Vec::new();
        for _ in 0..100 {
            consoles.push(c.instance_console_stream("chatty").await.unwrap());
        }
        (events, consoles)
    });
    let t = Instant::now();
    let (st, v) = s.json(
        Method::POST,
        "/v1/disks",
        json!({"name": "quick", "size": "1MiB"}),
    );
    assert_eq!(st, 201, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a disk took {:?} beside 500 idle streams",
        t.elapsed()
    );
    let (_, threads) = common::fds_and_threads(pid, true);
    assert!(
        threads <= threads_before + 4,
        "{threads} threads with 500 idle streams (before: {threads_before}): {:?}",
        thread_names(pid)
    );
    drop((events, consoles));
}

#[test]
fn an_export_that_fails_after_its_headers_aborts_the_connection() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // 4 MiB of data, stored as qcow2: every 64 KiB cluster allocated.
    let (st, _, body) = s.request(
        Method::POST,
        "/v1/disks/import?name=frail&format=qcow2",
        "application/octet-stream",
        &[],
        vec![0x5a; 4 << 20],
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let (_, disk) = s.json(Method::GET, "/v1/disks/frail", Value::Null);
    let file = s
        .state_dir
        .join("disks")
        .join(format!("{}.qcow2", disk["id"].as_str().unwrap()));
    // Cluster 40 (2.5 MiB in) now points to an unaligned offset: reading it fails.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut header = [0u8; 48];
    f.read_exact(&mut header).unwrap();
    let l1 = u64::from_be_bytes(header[40..48].try_into().unwrap());
    let mut entry = [0u8; 8];
    f.seek(SeekFrom::Start(l1)).unwrap();
    f.read_exact(&mut entry).unwrap();
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    f.seek(SeekFrom::Start(l2 + 40 * 8)).unwrap();
    f.write_all(&(0x8000_0000_0000_0201u64).to_be_bytes())
        .unwrap();
    drop(f);

    for (format, framing) in [("raw", "content-length: 4194304"), ("qcow2", "chunked")] {
        let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            c,
            "GET /v1/disks/frail/export?format={format} HTTP/1.1\r\nHost: kiln\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let r = c.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_lowercase();
        // The failure may cut the connection before the headers went out (the client sees it
        // close with no answer) or after them (a body short of what they announced): never
        // a complete answer.
        let Some(head_end) = text.find("\r\n\r\n").map(|i| i + 4) else {
            assert!(out.len() < 4096, "{r:?}: {text}");
            continue;
        };
        assert!(text.starts_with("http/1.1 200"), "{}", &text[..head_end]);
        assert!(text[..head_end].contains(framing), "{}", &text[..head_end]);
        let body = out.len() - head_end;
        match format {
            "raw" => assert!(body < 4 << 20, "the whole body came: {body} bytes, {r:?}"),
            _ => assert!(!text.ends_with("0\r\n\r\n"), "the chunked body was ended"),
        }
    }
}
