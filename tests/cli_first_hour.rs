//! A new user's first hour with the CLI, against a real `kiln serve`: the connection from the
//! environment and from flags before the subcommand, one size syntax, several names per
//! command, the detail view, a forced stop that says so, `set` through PATCH, `logs` kept
//! across a daemon restart, `events` and `operation` commands, a closed pipe, completions and
//! the man page, the daemon's own lines, and a socket the user may not open.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::server::Server;

/// `kiln ARGS` with `KILN_SOCKET` naming `socket` (and nothing else from the environment).
fn kiln_env(socket: &Path, args: &[&str]) -> Output {
    common::kiln()
        .args(args)
        .env("KILN_SOCKET", socket)
        .env_remove("KILN_URL")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `kiln ARGS` (socket from the environment); panics unless it succeeds; its stdout.
fn ok(s: &Server, args: &[&str]) -> String {
    let o = kiln_env(&s.socket, args);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "kiln {args:?}: {}\n{out}\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    out
}

/// Runs `kiln ARGS`; panics unless it fails with status 1 and one `kiln:` line; its stderr.
fn refused(s: &Server, args: &[&str]) -> String {
    let o = kiln_env(&s.socket, args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "kiln {args:?}: {out}\n{err}");
    assert!(err.starts_with("kiln: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json(s: &Server, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(s, &a)).unwrap()
}

#[test]
fn connection_from_the_environment_and_flags_before_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // KILN_SOCKET alone.
    assert!(ok(&s, &["instance", "list"]).starts_with("NAME"));
    // The flag before the subcommand wins over a wrong KILN_SOCKET, and so does one after.
    let wrong = dir.path().join("nothing.sock");
    let sock = s.socket.to_str().unwrap();
    for args in [
        vec!["--socket", sock, "instance", "list"],
        vec!["instance", "list", "--socket", sock],
        vec!["instance", "--socket", sock, "list"],
    ] {
        let o = kiln_env(&wrong, &args);
        assert!(o.status.success(), "{args:?}: {:?}", text(&o));
    }
    // A socket nobody serves: the hint names the flag and the variable.
    let o = kiln_env(&wrong, &["instance", "list"]);
    let (_, err) = text(&o);
    assert!(
        err.contains("nothing.sock") && err.contains("KILN_SOCKET"),
        "{err}"
    );
    // KILN_URL without a token says what is missing.
    let o = common::kiln()
        .args(["instance", "list"])
        .env("KILN_URL", "http://127.0.0.1:1")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_SOCKET")
        .output()
        .unwrap();
    assert!(text(&o).1.contains("KILN_TOKEN"), "{:?}", text(&o));
}

#[test]
fn sizes_names_detail_forced_stop_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // A bare number is MiB, in create as in run; units as `256M`, `1G`.
    let a = json(
        &s,
        &[
            "instance",
            "create",
            "a",
            "--memory",
            "64",
            "--cmdline",
            "console=ttyS0 probe=wait-powerbutton",
        ],
    );
    assert_eq!(a["memory"], 64 << 20);
    let b = json(
        &s,
        &[
            "instance",
            "create",
            "b",
            "--memory",
            "96M",
            "--cmdline",
            "console=ttyS0 probe=hlt",
        ],
    );
    assert_eq!(b["memory"], 96 << 20);
    // Several names per action.
    let out = ok(&s, &["instance", "start", "a", "b"]);
    assert_eq!(out.matches("running").count(), 2, "{out}");
    // `a` powers off on the power button; `b` halts and ignores it.
    let o = kiln_env(&s.socket, &["instance", "stop", "a"]);
    let (out, err) = text(&o);
    assert!(
        o.status.success() && !err.contains("forced"),
        "{out}\n{err}"
    );
    assert!(ok(&s, &["instance", "show", "a"]).contains("the guest powered off"));
    // A forced stop says so: on stderr, in state_reason, in the operation and the event.
    let o = kiln_env(&s.socket, &["instance", "stop", "b", "--timeout", "1"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("b: forced stop"), "{err}");
    let show = ok(&s, &["instance", "show", "b"]);
    assert!(
        show.lines()
            .any(|l| l.starts_with("state_reason:") && l.contains("forced stop")),
        "{show}"
    );
    assert!(
        show.contains("cmdline:      console=ttyS0 probe=hlt"),
        "{show}"
    );
    let ops = json(&s, &["operation", "list", "--instance", "b"]);
    let stop = ops
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "instance.stop")
        .unwrap();
    assert!(stop["detail"].as_str().unwrap().contains("forced stop"));
    let id = stop["id"].as_str().unwrap();
    assert_eq!(json(&s, &["operation", "show", id])[0]["id"], id);
    assert_eq!(
        json(&s, &["operation", "wait", id])[0]["state"],
        "succeeded"
    );
    let events = ok(&s, &["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains(" b ") && l.contains("stopped (forced stop")),
        "{events}"
    );
    // `show` of several; one unknown name fails the command, naming it.
    let out = ok(&s, &["instance", "show", "a", "b"]);
    assert_eq!(out.matches("name:").count(), 2, "{out}");
    let err = refused(&s, &["instance", "show", "a", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    // `set` changes vCPUs, memory and the command line of a stopped instance (PATCH)...
    let v = json(
        &s,
        &[
            "instance",
            "set",
            "b",
            "--memory",
            "128M",
            "--cmdline",
            "console=ttyS0 probe=cmdline,wait-powerbutton",
        ],
    );
    assert_eq!(v["memory"], 128 << 20);
    ok(&s, &["instance", "start", "b"]);
    assert!(s.wait_console(
        "b",
        "PROBE-OK cmdline console=ttyS0 probe=cmdline,wait-powerbutton",
        1
    ));
    // ...and is refused while it runs.
    let err = refused(&s, &["instance", "resize", "b", "--memory", "256M"]);
    assert!(err.contains("only while it is stopped"), "{err}");
    ok(&s, &["instance", "stop", "b"]);
    // Pause, resume, reset; more vCPUs than the host has are refused.
    ok(
        &s,
        &[
            "instance",
            "set",
            "b",
            "--cmdline",
            "console=ttyS0 probe=hlt",
        ],
    );
    ok(&s, &["instance", "start", "b"]);
    ok(&s, &["instance", "pause", "b"]);
    ok(&s, &["instance", "resume", "b"]);
    ok(&s, &["instance", "reset", "b"]);
    ok(&s, &["instance", "stop", "b", "--force"]);
    let err = refused(&s, &["instance", "set", "b", "--vcpus", "4096"]);
    assert!(err.contains("CPUs"), "{err}");
    // Delete several.
    ok(&s, &["instance", "delete", "a", "b"]);
    assert_eq!(ok(&s, &["instance", "list"]).lines().count(), 1);
}

#[test]
fn logs_survive_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket;
    {
        let s = Server::start(dir.path());
        socket = s.socket.clone();
        ok(
            &s,
            &[
                "instance",
                "create",
                "lg",
                "--cmdline",
                "console=ttyS0 probe=cpus,wait-powerbutton",
                "--start",
            ],
        );
        assert!(s.wait_console("lg", "PROBE-OK cpus 1", 1));
        ok(&s, &["instance", "stop", "lg"]);
        assert!(ok(&s, &["logs", "lg"]).contains("PROBE-OK cpus 1"));
    }
    let s = Server::start(dir.path());
    assert_eq!(s.socket, socket);
    let logs = ok(&s, &["logs", "lg"]);
    assert!(logs.contains("PROBE-OK cpus 1"), "{logs}");
    assert_eq!(ok(&s, &["logs", "lg", "--tail", "8"]).len(), 8);
    // --follow prints new output as it comes, and ends when the instance is deleted.
    let follow = common::kiln()
        .args(["logs", "lg", "--follow"])
        .env("KILN_SOCKET", &s.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    ok(&s, &["instance", "start", "lg"]);
    assert!(s.wait_console("lg", "PROBE-OK cpus 1", 2));
    ok(&s, &["instance", "stop", "lg"]);
    ok(&s, &["instance", "delete", "lg"]);
    let out = follow.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("PROBE-OK cpus 1").count(), 2, "{text}");
    // The history went with the instance.
    assert!(!std::fs::read_dir(s.state_dir.join("instances"))
        .unwrap()
        .any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "console")));
}

#[test]
fn a_closed_pipe_ends_quietly_and_completions_and_man_page_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    for i in 0..40 {
        ok(&s, &["disk", "create", &format!("d{i}"), "--size", "1"]);
    }
    let o = Command::new("bash")
        .args(["-o", "pipefail", "-c", "kiln disk list --json | head -c 10"])
        .env(
            "PATH",
            format!(
                "{}:/usr/bin:/bin",
                Path::new(env!("CARGO_BIN_EXE_kiln"))
                    .parent()
                    .unwrap()
                    .display()
            ),
        )
        .env("KILN_SOCKET", &s.socket)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{:?}: {out}\n{err}", o.status);
    assert_eq!(out.len(), 10);
    assert!(err.is_empty(), "{err}");
    let bash = ok(&s, &["completions", "bash"]);
    assert!(bash.contains("complete") && bash.contains("kiln"), "{bash}");
    for shell in ["zsh", "fish"] {
        assert!(ok(&s, &["completions", shell]).contains("operation"));
    }
    let man = ok(&s, &["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH kiln"),
        "{}",
        &man[..200]
    );
    assert!(
        man.contains(".TH kiln-instance"),
        "every subcommand has a page"
    );
}

#[test]
fn the_daemon_says_where_it_serves_and_logs_each_request() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["text", "json"] {
        let socket = dir.path().join(format!("{format}.sock"));
        let log = dir.path().join(format!("{format}.log"));
        let mut child = common::kiln()
            .args(["serve", "--log-format", format, "--state-dir"])
            .arg(dir.path().join(format!("state-{format}")))
            .env("KILN_SOCKET", &socket)
            .env_remove("KILN_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(std::time::Instant::now() < end, "no socket");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let o = kiln_env(&socket, &["instance", "list"]);
        assert!(o.status.success());
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains('\x1b'), "no ANSI colour in a file: {text}");
        assert!(
            text.lines()
                .any(|l| l.contains("ready") && l.contains(socket.to_str().unwrap())),
            "no start-up line: {text}"
        );
        let access = text
            .lines()
            .find(|l| l.contains("GET /v1/instances 200"))
            .unwrap_or_else(|| panic!("no access line: {text}"));
        assert!(access.contains("request_id"), "{access}");
        if format == "json" {
            for line in text.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v["level"].is_string(), "{line}");
            }
        }
    }
}

#[test]
fn a_socket_the_user_may_not_open_is_named_with_its_owner_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    // The directory may be searched by anyone; the socket is root's, mode 0660.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Server::start(dir.path());
    // The client as nobody (uid 65534).
    let o = common::kiln()
        .args(["instance", "list"])
        .env("KILN_SOCKET", &s.socket)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(
        err.contains("permission denied")
            && err.contains("owner root:root")
            && err.contains("mode 0660"),
        "{err}"
    );
    assert!(!err.contains("is `kiln serve` running"), "{err}");
}

#[test]
fn a_tap_kiln_created_goes_with_the_vm() {
    common::require_kvm();
    // In a network namespace of the test's own (`unshare -n`, root), a `kiln serve` whose
    // instance has a NIC on a TAP that does not exist yet: Kiln creates it at start; it is
    // gone once the VM stops, and stays gone after the delete.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
        set -eu
        ip link set lo up
        kiln serve --state-dir "$DIR/state" 2>"$DIR/serve.log" &
        serve=$!
        trap 'kill $serve; wait $serve' EXIT
        for _ in $(seq 100); do [ -S "$KILN_SOCKET" ] && break; sleep 0.05; done
        kiln instance create t1 --tap kilntest0 --cmdline "console=ttyS0 probe=hlt" --start >/dev/null
        ip link show kilntest0 >/dev/null && echo "running: present"
        kiln instance stop t1 --force >/dev/null
        ip link show kilntest0 >/dev/null 2>&1 || echo "stopped: absent"
        kiln instance delete t1
        ip link show kilntest0 >/dev/null 2>&1 || echo "deleted: absent"
    "#;
    let o = Command::new("unshare")
        .args(["-n", "bash", "-c", script])
        .env("DIR", dir.path())
        .env("KILN_SOCKET", dir.path().join("kiln.sock"))
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                Path::new(env!("CARGO_BIN_EXE_kiln"))
                    .parent()
                    .unwrap()
                    .display()
            ),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(
        out, "running: present\nstopped: absent\ndeleted: absent\n",
        "{err}"
    );
}
