//! `kiln console`: the serial console of an instance of a real `kiln serve`, over the Unix
//! socket and over TCP with the token; piped and on a terminal (a pty); its refusals.

mod common;

use common::server::{action, Server};

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use client::Method;
use serde_json::json;

/// What a `kiln console` run printed.
struct Out {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn dump(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `kiln console` pointed at the server's socket, `input` on its stdin; killed after `limit`.
fn console(s: &Server, args: &[&str], input: &[u8], limit: Duration) -> Out {
    let mut cmd = common::kiln();
    cmd.arg("console").args(args).arg("--socket").arg(&s.socket);
    run(cmd, input, limit)
}

fn run(mut cmd: Command, input: &[u8], limit: Duration) -> Out {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut stdin = child.stdin.take().unwrap();
    // A console that is refused exits without reading its stdin: the write may find the pipe
    // closed, which is no failure of the test.
    let _ = stdin.write_all(input);
    drop(stdin);
    collect(child, limit)
}

fn collect(mut child: Child, limit: Duration) -> Out {
    // The caller may have taken stdout to read it as it comes.
    let out = child.stdout.take();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut out) = out {
            let _ = out.read_to_end(&mut s);
        }
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        status,
        stdout: String::from_utf8_lossy(&o.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&e.join().unwrap()).into_owned(),
    }
}

/// An instance running the probe with `probe=<cmds>`, its banner line printed.
fn running(s: &Server, name: &str, cmds: &str, ready: &str) {
    let body = json!({"name": name, "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={cmds}")}});
    let (st, v) = s.json(Method::POST, "/v1/instances", body);
    assert_eq!(st, 201, "{v}");
    let (st, v) = action(s, name, json!({"action": "start"}));
    assert_eq!(st, 200, "{v}");
    assert!(s.wait_console(name, ready, 1), "{}", s.console(name));
}

#[test]
fn piped_input_is_typed_into_the_guest_and_its_answer_printed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    running(&s, "echo", "echo", "PROBE-OK echo ready");
    let r = console(&s, &["echo"], b"hello\r", Duration::from_secs(30));
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("PROBE-ECHO hello"), "{}", r.dump());
    assert!(
        r.stderr.contains("Connected to echo; detach with Ctrl-]"),
        "{}",
        r.dump()
    );
    // The guest only answers what it was sent: nothing from before the connection.
    assert!(!r.stdout.contains("KILN-PROBE"), "{}", r.dump());
}

#[test]
fn the_console_ends_when_the_guest_powers_off_and_on_ctrl_close_bracket() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    running(&s, "bye", "echo,poweroff", "PROBE-OK echo ready");
    // --timeout 0: only the instance stopping ends it.
    let r = console(
        &s,
        &["bye", "--timeout", "0"],
        b"one\rquit\r",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(0), "{}", r.dump());
    for want in ["PROBE-ECHO one", "PROBE-OK echo done", "PROBE-OK poweroff"] {
        assert!(r.stdout.contains(want), "{want}: {}", r.dump());
    }
    assert!(
        r.stderr.contains("Instance bye is stopped."),
        "{}",
        r.dump()
    );

    // Ctrl-] detaches at once, even with --timeout 0; what came before it is sent.
    running(&s, "stay", "echo", "PROBE-OK echo ready");
    let start = Instant::now();
    let r = console(
        &s,
        &["stay", "--timeout", "0"],
        b"first\r\x1dsecond\r",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.stderr.contains("Detached from stay."), "{}", r.dump());
    assert!(start.elapsed() < Duration::from_secs(20), "{}", r.dump());
    // "first" reached the guest, "second" did not.
    assert!(
        s.wait_console("stay", "PROBE-ECHO first", 1),
        "{}",
        s.console("stay")
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !s.console("stay").contains("second"),
        "{}",
        s.console("stay")
    );
}

#[test]
fn over_tcp_with_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let s = Server::start_with(
        dir.path(),
        &["--listen", &addr, "--token-file", token.to_str().unwrap()],
    );
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    running(&s, "echo", "echo", "PROBE-OK echo ready");
    let url = format!("http://{addr}");
    let tcp = |token: &str, input: &[u8]| {
        let mut cmd = common::kiln();
        cmd.args(["console", "echo", "--url", &url, "--token", token])
            .env_remove("KILN_TOKEN");
        run(cmd, input, Duration::from_secs(30))
    };
    let r = tcp("s3cret-token", b"over tcp\r");
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("PROBE-ECHO over tcp"), "{}", r.dump());

    let r = tcp("wrong", b"x\r");
    assert_eq!(r.status, Some(1), "{}", r.dump());
    assert!(r.stderr.contains("unauthorized"), "{}", r.dump());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
}

#[test]
fn refusals_are_one_line_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let body = json!({"name": "idle", "vcpus": 1, "memory": "64MiB",
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    let cases = [
        ("ghost", "not found"),
        ("idle", "instance idle is stopped; start it first"),
    ];
    for (name, want) in cases {
        let r = console(&s, &[name], b"", Duration::from_secs(30));
        assert_eq!(r.status, Some(1), "{}", r.dump());
        assert!(r.stdout.is_empty(), "{}", r.dump());
        let lines: Vec<_> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}", r.dump());
        assert!(lines[0].contains(want), "{want}: {}", r.dump());
    }
    let mut cmd = common::kiln();
    cmd.args(["console", "idle", "--socket"])
        .arg(dir.path().join("nowhere.sock"));
    let r = run(cmd, b"", Duration::from_secs(30));
    assert_eq!(r.status, Some(1), "{}", r.dump());
    assert!(r.stderr.contains("cannot connect to"), "{}", r.dump());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
}

/// A pty pair: (controller, terminal).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut m, mut t) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut t,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors from openpty.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(t)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: tcgetattr into a struct we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t.c_lflag
    }
}

#[test]
fn on_a_terminal_raw_mode_then_ctrl_close_bracket_detaches_and_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    running(&s, "tty", "echo", "PROBE-OK echo ready");
    let (controller, terminal) = openpty();
    let before = lflag(&terminal);
    assert_ne!(before & libc::ICANON, 0, "a fresh pty is in canonical mode");
    let mut child = common::kiln()
        .args(["console", "tty", "--socket"])
        .arg(&s.socket)
        .stdin(Stdio::from(terminal.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Raw mode: no canonical input, no echo, no signals from the keyboard.
    let end = Instant::now() + Duration::from_secs(20);
    while lflag(&terminal) & libc::ICANON != 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let raw = lflag(&terminal);
    assert_eq!(raw & (libc::ICANON | libc::ECHO | libc::ISIG), 0, "{raw:o}");

    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    let mut keys = std::fs::File::from(controller.try_clone().unwrap());
    keys.write_all(b"typed\r").unwrap();
    let mut seen = String::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !seen.contains("PROBE-ECHO typed") {
        let Some(left) = end.checked_duration_since(Instant::now()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok(l) => seen.push_str(&l),
            Err(_) => break,
        }
    }
    assert!(seen.contains("PROBE-ECHO typed"), "{seen}");
    keys.write_all(&[0x1d]).unwrap();
    let r = collect(child, Duration::from_secs(20));
    assert_eq!(r.status, Some(0), "{}", r.dump());
    assert!(r.stderr.contains("Detached from tty."), "{}", r.dump());
    assert_eq!(lflag(&terminal), before, "the terminal's settings are back");
    // The instance still runs: detaching does not stop it.
    assert_eq!(
        s.json(Method::GET, "/v1/instances/tty", serde_json::Value::Null)
            .1["state"],
        "running"
    );
}
