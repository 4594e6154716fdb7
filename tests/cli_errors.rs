//! `kiln run` refuses bad arguments with one line that says what to fix — never a panic.

mod common;

use common::*;
use std::time::Duration;

fn refused(args: &[&str]) -> String {
    require_kvm();
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    let r = run_kiln(&a, Duration::from_secs(30));
    assert!(!r.timed_out, "{}", r.dump());
    assert_eq!(r.status, Some(2), "{}", r.dump());
    assert!(r.stdout.is_empty(), "no guest may have run: {}", r.dump());
    assert!(!r.stderr.contains("panicked"), "{}", r.dump());
    let lines: Vec<_> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {}", r.dump());
    lines[0].to_string()
}

#[test]
fn missing_kernel() {
    let e = refused(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(
        e.contains("--kernel") && e.contains("/nonexistent/vmlinux"),
        "{e}"
    );
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("notes.txt");
    std::fs::write(&f, "hello, this is not a kernel\n".repeat(100)).unwrap();
    let e = refused(&["--kernel", f.to_str().unwrap()]);
    assert!(e.contains("is not a kernel"), "{e}");
    let e = refused(&["--kernel", "/tmp"]);
    assert!(e.contains("--kernel"), "{e}");
}

#[test]
fn zero_vcpus() {
    let e = refused(&["--cpus", "0"]);
    assert!(e.contains("--cpus") && e.contains("at least 1"), "{e}");
}

#[test]
fn more_vcpus_than_kvm_allows() {
    for n in ["255", "100000"] {
        let e = refused(&["--cpus", n]);
        assert!(e.contains("--cpus") && e.contains("allows at most"), "{e}");
    }
}

#[test]
fn more_memory_than_the_host_has() {
    let e = refused(&["--memory", "64TiB"]);
    assert!(
        e.contains("--memory") && e.contains("the host has only"),
        "{e}"
    );
}

#[test]
fn memory_with_an_unknown_unit() {
    let e = refused(&["--memory", "12XB"]);
    assert!(
        e.contains("--memory") && e.contains("unknown unit \"XB\""),
        "{e}"
    );
}

#[test]
fn missing_initrd() {
    let e = refused(&["--initrd", "/nonexistent/initrd"]);
    assert!(
        e.contains("--initrd") && e.contains("/nonexistent/initrd"),
        "{e}"
    );
}

#[test]
fn run_and_serve_answer_help_and_mistakes_as_the_whole_cli_does() {
    // `kiln run` and `kiln serve` parse their own arguments alone (main.rs); what that parse
    // refuses goes through the full parser, so help and errors name the subcommand as before.
    for (args, status, out, err) in [
        (&["run", "--help"][..], 0, "Usage: kiln run [OPTIONS]", ""),
        (
            &["serve", "--help"][..],
            0,
            "Usage: kiln serve [OPTIONS]",
            "",
        ),
        (&["run", "--bogus"][..], 2, "", "Usage: kiln run [OPTIONS]"),
        (
            &["serve", "--bogus"][..],
            2,
            "",
            "Usage: kiln serve [OPTIONS]",
        ),
        (
            &["run", "--cpus"][..],
            2,
            "",
            "a value is required for '--cpus <N>'",
        ),
    ] {
        let r = run_kiln(args, Duration::from_secs(30));
        assert_eq!(r.status, Some(status), "{args:?}: {}", r.dump());
        assert!(
            r.stdout.contains(out) && r.stderr.contains(err),
            "{args:?}: {}",
            r.dump()
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.dump());
    }
    // What parses goes on to the subcommand itself: its own checks answer.
    let r = run_kiln(
        &[
            "serve",
            "--listen",
            "127.0.0.1:9",
            "--socket",
            "/nonexistent/k.sock",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(2), "{}", r.dump());
    assert!(
        r.stderr.contains("--listen needs --token-file"),
        "{}",
        r.dump()
    );
}
