//! What the benches share: the probe guest's path, running a VMM until the probe's bench
//! results are in, the QEMU microvm command line, `--flag N` arguments, and `kiln serve` as a
//! child process. Included with `mod common;` by each bench (a directory module, so Cargo
//! does not take it for a bench of its own); not every bench uses every item.

#![allow(dead_code)]

pub mod peers;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The probe guest's banner, the first line it prints.
pub const BANNER: &str = "KILN-PROBE v1 ";

/// The probe.elf that build.rs made for this build, the one the `kiln` binary embeds.
pub fn probe_elf() -> PathBuf {
    let p = Path::new(env!("OUT_DIR")).join("probe.elf");
    assert!(
        p.metadata().is_ok_and(|m| m.len() > 0),
        "{} missing or empty (build.rs builds it)",
        p.display()
    );
    p
}

/// `&str`s to owned arguments.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The value after `--name` on the command line, or `default` when it is absent or does
/// not parse.
pub fn arg<T: FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `--flag` is on the command line.
pub fn has(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

// ---------------------------------------------------------------------------------------
// The probe's bench commands

/// One bench command that completed: its PROBE-BENCH-END line and the time between its
/// START and END lines, taken on the host.
#[derive(Clone, Debug)]
pub struct Bench {
    pub end: String,
    pub time: Duration,
    /// CPU time the VMM's own threads (all but its vCPUs) spent between START and END.
    pub vmm_cpu: Duration,
    /// CPU time of its vCPU threads in that span (the guest's own run included).
    pub vcpu_cpu: Duration,
}

impl Bench {
    /// A `key=N` number of the END line (`bytes=`, `frames=`); 0 when absent.
    pub fn field(&self, key: &str) -> u64 {
        field(&self.end, key)
    }

    pub fn bytes(&self) -> u64 {
        self.field("bytes=")
    }

    /// MB/s (10^6) of the END line's bytes.
    pub fn mbps(&self) -> f64 {
        mbps(self.bytes(), self.time)
    }
}

/// One bench command's result: the measurement, or the PROBE-FAIL line that replaced it.
pub type BenchResult = Result<Bench, String>;

/// The probe commands that report PROBE-BENCH-START/END (or fail instead).
const BENCH_COMMANDS: &[&str] = &["blk-bench", "blk-rbench", "net-blast"];

/// Starts a VMM command line: stdin empty, stdout (the guest's serial port) piped to the
/// bench, stderr dropped.
pub fn spawn_vmm(cmd: &[String]) -> Child {
    Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", cmd[0]))
}

/// Runs a VMM command until the probe is done (PROBE-DONE, power-off, triple fault), its
/// output ends, or `limit` passes. Returns one entry per bench command, in order: its
/// measurement, or its PROBE-FAIL line, so that results keep their positions when one
/// fails. Every PROBE-FAIL line is also printed on stderr.
pub fn bench_run(cmd: &[String], limit: Duration) -> Vec<BenchResult> {
    let mut child = spawn_vmm(cmd);
    let out = child.stdout.take().unwrap();
    let deadline = Instant::now() + limit;
    let mut start = None;
    let mut results = Vec::new();
    let pid = child.id();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        let line = line.trim_end_matches('\r').to_string();
        if line.starts_with("PROBE-BENCH-START") {
            start = Some((Instant::now(), thread_cpu(pid)));
        } else if line.starts_with("PROBE-BENCH-END") {
            if let Some((s, (vmm0, vcpu0))) = start.take() {
                let time = s.elapsed();
                let (vmm1, vcpu1) = thread_cpu(pid);
                results.push(Ok(Bench {
                    time,
                    end: line.clone(),
                    vmm_cpu: vmm1.saturating_sub(vmm0),
                    vcpu_cpu: vcpu1.saturating_sub(vcpu0),
                }));
            }
        } else if let Some(rest) = line.strip_prefix("PROBE-FAIL ") {
            eprintln!("{}: {line}", cmd[0]);
            let command = rest.split_whitespace().next().unwrap_or("");
            if BENCH_COMMANDS.contains(&command) {
                start = None;
                results.push(Err(line.clone()));
            }
        }
        if line.starts_with("PROBE-DONE")
            || line == "PROBE-OK poweroff"
            || line == "PROBE-OK triplefault"
            || Instant::now() > deadline
        {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    results
}

/// CPU time so far of a process's threads (`/proc/PID/task/*/schedstat`, on-CPU
/// nanoseconds): (the VMM's own threads, its vCPU threads). vCPU threads are told by their
/// names: Kiln's `kiln-vcpuN`, QEMU's `CPU N/KVM`, Firecracker's `fc_vcpu N`, Cloud
/// Hypervisor's `vcpuN`. Threads that ended before the call are not counted.
pub fn thread_cpu(pid: u32) -> (Duration, Duration) {
    let (mut vmm, mut vcpu) = (0u64, 0u64);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    for t in tasks.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let name = name.trim();
        if name.contains("vcpu") || (name.starts_with("CPU ") && name.ends_with("/KVM")) {
            vcpu += ns;
        } else {
            vmm += ns;
        }
    }
    (Duration::from_nanos(vmm), Duration::from_nanos(vcpu))
}

/// The number after `key` (`bytes=`) in a line's words; 0 when absent.
pub fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// MB/s (10^6 bytes per second).
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

// ---------------------------------------------------------------------------------------
// QEMU microvm

/// What differs between the benches' QEMU microvm command lines.
pub struct Microvm<'a> {
    /// The `-M` value: `microvm,acpi=off` (GUESTS.md's reference machine), with `,rtc=on`
    /// for io.rs.
    pub machine: &'a str,
    /// `-smp N`, or QEMU's default when `None`.
    pub smp: Option<u32>,
    /// `-m`, in MiB.
    pub memory_mib: u32,
    /// `-global virtio-mmio.force-legacy=false`: virtio 1.0 devices (the probe has no
    /// legacy driver); needed when there are devices.
    pub modern_virtio: bool,
    /// Options after `-kernel`: drives, NICs.
    pub devices: Vec<String>,
    /// The probe's command line (`-append`).
    pub append: String,
}

/// `qemu-system-x86_64` booting the probe guest on microvm with KVM. Without ACPI a probe
/// ends with `triplefault`, which ends QEMU through `-no-reboot`.
pub fn qemu_microvm(probe: &Path, vm: Microvm) -> Vec<String> {
    let mut v = strings(&[
        "qemu-system-x86_64",
        "-M",
        vm.machine,
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        // Thread names (`CPU 0/KVM`), so that `thread_cpu` tells vCPUs from the rest.
        "-name",
        "debug-threads=on",
    ]);
    if let Some(n) = vm.smp {
        v.extend(["-smp".to_string(), n.to_string()]);
    }
    v.extend(["-m".to_string(), vm.memory_mib.to_string()]);
    if vm.modern_virtio {
        v.extend(strings(&["-global", "virtio-mmio.force-legacy=false"]));
    }
    v.extend(["-kernel".to_string(), probe.to_str().unwrap().to_string()]);
    v.extend(vm.devices);
    v.extend(["-append".to_string(), vm.append]);
    v
}

// ---------------------------------------------------------------------------------------
// kiln serve

/// `kiln serve` as a child process on `<dir>/kiln.sock` with its state in `<dir>/state`.
/// Dropping it sends SIGTERM and waits up to 20 s for the server to exit, then kills it.
pub struct Serve {
    child: Child,
    pub socket: PathBuf,
}

impl Serve {
    /// Starts the server and returns once its socket accepts a connection (at most 10 s).
    /// `stderr` is where the server's log goes.
    pub fn start(dir: &Path, stderr: Stdio) -> Serve {
        Self::start_with(dir, stderr, &[])
    }

    /// [`Serve::start`] with more `kiln serve` arguments (`--no-sandbox`).
    pub fn start_with(dir: &Path, stderr: Stdio, extra: &[&str]) -> Serve {
        let socket = dir.join("kiln.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn kiln serve");
        // From here on, a panic drops `serve`, which ends the child.
        let mut serve = Serve { child, socket };
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&serve.socket).is_err() {
            if let Ok(Some(st)) = serve.child.try_wait() {
                panic!("kiln serve exited before accepting connections: {st}");
            }
            assert!(
                Instant::now() < end,
                "kiln serve accepted no connection on {} within 10 s",
                serve.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        serve
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS of the server, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: SIGTERM to our own child, not yet reaped (its pid cannot be reused).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("kiln serve did not exit within 20 s of SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
