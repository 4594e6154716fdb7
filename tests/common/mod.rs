//! Helpers for the integration tests: run the real `kiln` binary on real KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Open fds and threads of a process (`/proc/PID/fd`, `/proc/PID/task`). Without
/// `sockets`, socket fds are left out: a test's own HTTP connections come and go with its
/// requests.
pub fn fds_and_threads(pid: u32, sockets: bool) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            sockets
                || std::fs::read_link(e.path())
                    .is_ok_and(|l| !l.to_string_lossy().starts_with("socket:"))
        })
        .count();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    (fds, threads)
}

/// The kiln binary under test.
pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// The probe guest without the PVH note (entered through the Linux 64-bit protocol).
pub fn probe_linux64() -> PathBuf {
    Path::new(env!("OUT_DIR")).join("probe-linux64.elf")
}

/// Fails loudly when /dev/kvm is missing: these tests never pass by skipping.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots guests and needs /dev/kvm: {e}");
    }
}

/// What a `kiln` run produced.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Run {
    /// Guest output lines, without the serial line endings.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect()
    }

    /// True when a line equals `line` exactly.
    pub fn has_line(&self, line: &str) -> bool {
        self.lines().contains(&line)
    }

    /// Number of lines starting with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status {:?} (timed out: {})\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.timed_out, self.stdout, self.stderr
        )
    }
}

/// Runs `kiln` with `args`, killing it after `limit`.
pub fn run_kiln(args: &[&str], limit: Duration) -> Run {
    let mut child = kiln()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status: status.code(),
        stdout: String::from_utf8_lossy(&o.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&e.join().unwrap()).into_owned(),
        timed_out,
    }
}

/// Boots the embedded probe guest with `probe=<cmds>` and extra `kiln run` arguments.
pub fn probe(cmds: &str, extra: &[&str]) -> Run {
    require_kvm();
    let cmdline = format!("console=ttyS0 probe={cmds}");
    let mut args = vec!["run", "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    run_kiln(&args, Duration::from_secs(60))
}

/// Builds (or finds in the cache) the distro guest with images/guest/build-guest.sh and
/// returns the cache directory.
pub fn distro_guest(kernel_only: bool) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/guest/build-guest.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if kernel_only {
        cmd.arg("--kernel-only");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-guest.sh");
    assert!(
        out.status.success(),
        "images/guest/build-guest.sh failed; it needs apt (run `apt-get update` once)"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let vmlinux = stdout
        .lines()
        .find_map(|l| l.strip_prefix("vmlinux="))
        .expect("build-guest.sh printed no vmlinux= line");
    Path::new(vmlinux).parent().unwrap().to_path_buf()
}

/// Runs `kiln` and reads its stdout until every string of `want` has appeared in it (or
/// `limit` passes), then kills it. Returns the output so far.
pub fn run_until(args: &[&str], want: &[&str], limit: Duration) -> Run {
    run_until_then(kiln(), args, want, limit, || {})
}

/// [`run_until`] with a command of the caller's (e.g. inside a network namespace), calling
/// `seen` once every wanted string appeared, while kiln still runs.
pub fn run_until_then(
    mut cmd: Command,
    args: &[&str],
    want: &[&str],
    limit: Duration,
    seen: impl FnOnce(),
) -> Run {
    use std::io::BufRead;
    use std::sync::mpsc;
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut seen = Some(seen);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let e = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let mut stdout = String::new();
    let mut timed_out = true;
    while let Some(left) = limit.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                stdout.push_str(&line);
                stdout.push('\n');
                if want.iter().all(|w| stdout.contains(w)) {
                    timed_out = false;
                    if let Some(f) = seen.take() {
                        f();
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                timed_out = false;
                break;
            }
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    Run {
        status: status.code(),
        stdout,
        stderr: String::from_utf8_lossy(&e.join().unwrap()).into_owned(),
        timed_out,
    }
}

/// The probe's disk pattern: the byte at disk offset `o` for seed `s`.
pub fn pattern(seed: u8, o: u64) -> u8 {
    seed.wrapping_add((o.wrapping_mul(7)).wrapping_add(o >> 9) as u8)
}

/// `len` bytes of the pattern from disk offset `start`.
pub fn pattern_bytes(seed: u8, start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64)
        .map(|o| pattern(seed, o))
        .collect()
}

/// Boots the probe with `cmds` and extra arguments, until it powers off.
pub fn probe_args(cmds: &str, extra: &[String]) -> Run {
    let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
    probe(cmds, &extra)
}

/// A console sink tests can read while the VM writes to it.
#[derive(Clone, Default)]
pub struct Buffer(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `what` appears, at most `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.text().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}
pub mod netns;
pub mod server;
