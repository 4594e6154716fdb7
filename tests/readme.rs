//! The README's shell examples, run as written. Every fenced block whose info string is
//! `sh test` is run by bash (`set -euo pipefail`), in order, in one scratch directory, with
//! `kiln` on the PATH and `KILN_SOCKET` naming a fresh `kiln serve` (the probe guest is its
//! only image): each block must succeed, and no output may show a panic. A README example
//! that drifts from the code fails here.

mod common;

use std::path::Path;
use std::process::Command;

use common::server::Server;

/// The fenced blocks of `markdown` whose info string is `sh test`, with the line each starts on.
fn tested_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```") => {
                let info: Vec<&str> = fence.trim_start_matches('`').split_whitespace().collect();
                current = Some((n + 1, String::new()));
                if info != ["sh", "test"] {
                    current.as_mut().unwrap().0 = 0;
                }
            }
            None => {}
            Some(_) if fence.starts_with("```") => {
                let (start, text) = current.take().unwrap();
                if start > 0 {
                    blocks.push((start, text));
                }
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn the_readme_examples_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = tested_blocks(&readme);
    assert!(
        blocks.len() >= 4,
        "the README has {} blocks marked `sh test`",
        blocks.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_kiln")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (line, block) in blocks {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &block])
            .current_dir(&work)
            .env("PATH", &path)
            .env("KILN_SOCKET", &s.socket)
            .env_remove("KILN_URL")
            .env_remove("KILN_TOKEN")
            .env_remove("KILN_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let shown = format!(
            "README.md line {line}:\n{block}--- status {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
            out.status
        );
        assert!(out.status.success(), "{shown}");
        assert!(!format!("{stdout}{stderr}").contains("panicked"), "{shown}");
        eprintln!("{shown}");
    }
}

#[test]
fn blocks_are_found_by_their_info_string() {
    let md = "a\n```sh test\necho 1\n```\n```sh\nno\n```\n```sh test\necho 2\necho 3\n```\n";
    let b = tested_blocks(md);
    assert_eq!(
        b,
        vec![(2, "echo 1\n".into()), (8, "echo 2\necho 3\n".into())]
    );
}
