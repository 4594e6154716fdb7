//! Snapshot benchmark: a 256 MiB probe guest snapshotted (pause-to-resumed time, bytes
//! written), restored to running in this process and in a new `kiln run --restore`
//! process, and 100 clones of one snapshot (creation rate, RSS per clone); with
//! `--firecracker PATH`, Firecracker's snapshot and restore of the same guest beside it.
//!
//!     cargo bench --bench snapshot -- [--runs N] [--clones N] [--memory MIB]
//!                                     [--firecracker PATH]
//!
//! In-process figures use the `vmm` API as `kiln serve` does. "Running again" is the moment
//! the restored VM's vCPU threads are started with their saved state (the `Booted` event);
//! "answers" is a console line sent to the restored guest and its reply read back.

mod common;

use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{arg, has, probe_elf};
use vmm::{
    Console, Exit, Host, KernelImage, PreparedVm, RestoreOptions, Snapshot, Vm, VmConfig, VmEvent,
    VmHandle,
};

static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// A console sink the bench can search.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn wait_for(&self, what: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if String::from_utf8_lossy(&self.0.lock().unwrap()).contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    }
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds from pipe().
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

struct Running {
    handle: VmHandle,
    out: Sink,
    // The console input's write end, kept open while the guest runs.
    _input: std::fs::File,
    booted: Arc<Mutex<Option<Instant>>>,
    thread: std::thread::JoinHandle<Result<Exit, vmm::VmError>>,
}

fn run(mut vm: Vm, out: Sink, input: std::fs::File) -> Running {
    let booted = Arc::new(Mutex::new(None));
    let b = booted.clone();
    vm.set_observer(Arc::new(move |e| {
        if let VmEvent::Booted { .. } = e {
            *b.lock().unwrap() = Some(Instant::now());
        }
    }));
    let handle = vm.handle();
    Running {
        handle,
        out,
        _input: input,
        booted,
        thread: std::thread::spawn(move || vm.run()),
    }
}

fn console() -> (Console, Sink, std::fs::File) {
    let (r, w) = pipe();
    let out = Sink::default();
    (
        Console {
            output: Box::new(out.clone()),
            input: Some(r),
        },
        out,
        w,
    )
}

fn boot(host: &Arc<Host>, memory_mib: u64, cmds: &str) -> Running {
    let config = VmConfig {
        vcpus: 1,
        memory: memory_mib << 20,
        kernel: KernelImage::Bytes(bytes::Bytes::from_static(PROBE)),
        initrd: None,
        cmdline: format!("console=ttyS0 probe={cmds}"),
        disks: Vec::new(),
        nets: Vec::new(),
        pit: false,
    };
    let (c, out, input) = console();
    let vm = Vm::new(host.clone(), config, c).expect("VM");
    run(vm, out, input)
}

fn stop(r: Running) {
    r.handle.stop();
    let _ = r.thread.join();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (VmRSS, RssAnon, RssFile) of this process, in KiB.
fn rss() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"), get("RssFile:"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = arg(&args, "--runs", 10);
    let clones: usize = arg(&args, "--clones", 100);
    let memory: u64 = arg(&args, "--memory", 256);
    let firecracker: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--firecracker")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let _ = has(&args, "--bench");
    let _ = probe_elf();
    let tmp = tempfile::tempdir().unwrap();
    let host = Arc::new(Host::open().expect("/dev/kvm"));

    // 1. Snapshots of a running guest (it counts, so it runs between them).
    let g = boot(&host, memory, "count");
    assert!(g.out.wait_for("PROBE-COUNT 1", Duration::from_secs(30)));
    let (mut paused, mut written, mut state) = (Vec::new(), 0, 0);
    for i in 0..runs {
        let r = g
            .handle
            .snapshot(&tmp.path().join(format!("s{i}")))
            .unwrap();
        paused.push(r.paused_for.as_secs_f64() * 1e3);
        written = r.memory_written;
        state = r.state_bytes;
    }
    stop(g);
    println!(
        "snapshot of a {memory} MiB probe guest: pause to resumed {:.2} ms (median of {runs}), \
         memory written {:.2} MiB of {memory} MiB, memory file on disk {:.2} MiB, state file {} KiB",
        median(&mut paused),
        written as f64 / (1 << 20) as f64,
        allocated(&tmp.path().join("s0/memory")) as f64 / (1 << 20) as f64,
        state >> 10,
    );

    // 2. Restore in this process: a guest waiting for a console line.
    let g = boot(&host, memory, "note,echo");
    assert!(g
        .out
        .wait_for("PROBE-OK note ready", Duration::from_secs(30)));
    let dir = tmp.path().join("waiting");
    g.handle.snapshot(&dir).unwrap();
    stop(g);
    let (mut load, mut prepare) = (Vec::new(), Vec::new());
    let (mut running, mut answers) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for i in 0..runs {
        let t = Instant::now();
        let snap = Arc::new(Snapshot::load(&dir).unwrap());
        load.push(t.elapsed().as_secs_f64() * 1e3);
        // Cold: Vm::restore does everything; warm: the shell was prepared beforehand.
        for (k, warm) in [false, true].into_iter().enumerate() {
            let (c, out, mut input) = console();
            let shell = warm.then(|| {
                let t = Instant::now();
                let p = PreparedVm::new(&host, snap.clone()).unwrap();
                prepare.push(t.elapsed().as_secs_f64() * 1e3);
                p
            });
            let t = Instant::now();
            let options = RestoreOptions::default();
            let vm = match shell {
                Some(p) => Vm::restore_prepared(host.clone(), p, &options, c),
                None => Vm::restore(host.clone(), snap.clone(), &options, c),
            }
            .unwrap();
            let r = run(vm, out, input.try_clone().unwrap());
            while r.booted.lock().unwrap().is_none() {
                std::thread::yield_now();
            }
            running[k].push((r.booted.lock().unwrap().unwrap() - t).as_secs_f64() * 1e3);
            input.write_all(format!("run{i}\n").as_bytes()).unwrap();
            assert!(r
                .out
                .wait_for(&format!("PROBE-OK note run{i}"), Duration::from_secs(10)));
            answers[k].push(t.elapsed().as_secs_f64() * 1e3);
            stop(r);
        }
    }
    println!(
        "restore in-process: load and check the snapshot {:.2} ms; Vm::restore to vCPUs running {:.2} ms, \
         to the guest's answer on its console {:.2} ms; with a shell prepared ahead ({:.2} ms, off the path): \
         {:.2} ms to vCPUs running, {:.2} ms to the answer (medians of {runs})",
        median(&mut load),
        median(&mut running[0]),
        median(&mut answers[0]),
        median(&mut prepare),
        median(&mut running[1]),
        median(&mut answers[1]),
    );

    // 3. `kiln run --restore` in a new process: from its start to the restored guest's
    // answer to a console line (stdin a pseudo-terminal, as a person's would be).
    let mut cli = Vec::new();
    for i in 0..runs.min(5) {
        cli.push(restore_process(&dir, i).as_secs_f64() * 1e3);
    }
    println!(
        "kiln run --restore: process start to the restored guest's answer on its console {:.1} ms (median)",
        median(&mut cli)
    );

    // 4. Clones: many VMs from one snapshot of a halted guest, in this process.
    let g = boot(&host, memory, "hlt");
    assert!(g.out.wait_for("PROBE-OK hlt", Duration::from_secs(30)));
    let hdir = tmp.path().join("halted");
    g.handle.snapshot(&hdir).unwrap();
    stop(g);
    let snap = Arc::new(Snapshot::load(&hdir).unwrap());
    let before = rss();
    let t = Instant::now();
    let mut all = Vec::new();
    for _ in 0..clones {
        let (c, out, input) = console();
        let vm = Vm::restore(host.clone(), snap.clone(), &RestoreOptions::default(), c).unwrap();
        all.push(run(vm, out, input));
    }
    for r in &all {
        while r.booted.lock().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let after = rss();
    let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / clones as f64;
    println!(
        "{clones} clones of one {memory} MiB snapshot: created in {:.0} ms ({:.0} clones/s); RSS per clone {:.0} KiB \
         (anonymous {:.0} KiB, file-backed {:.0} KiB: the snapshot's page cache, shared by all)",
        took.as_secs_f64() * 1e3,
        clones as f64 / took.as_secs_f64(),
        per(after.0, before.0),
        per(after.1, before.1),
        per(after.2, before.2),
    );
    for r in all {
        stop(r);
    }

    // 5. The same through `kiln serve`'s API.
    serve_bench(tmp.path(), memory, runs, clones);

    if let Some(fc) = firecracker {
        firecracker_bench(&fc, tmp.path(), memory, runs);
    } else {
        println!("firecracker: not measured (give --firecracker PATH)");
    }
}

/// VmRSS, RssAnon and RssFile of a process, in bytes.
fn rss_of(pid: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            << 10
    };
    (kib("VmRSS:"), kib("RssAnon:"), kib("RssFile:"))
}

/// Snapshot, restore and clones through a real `kiln serve` and its API: the snapshot's
/// pause and bytes as the API reports them, the daemon's own restore times (from its log:
/// cold, then from the shell it prepared), and `count` clones in one request (the time to
/// all of them running, the daemon's RSS per clone).
fn serve_bench(tmp: &Path, memory: u64, runs: usize, clones: usize) {
    use client::wire::{InstanceCreate, InstanceRestore, RestoreSource, SnapshotCreate};
    use std::process::{Command, Stdio};
    let dir = tmp.join("serve");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("kiln.sock");
    let log = dir.join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("KILN_LOG", "control=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = client::Client::unix(&socket);
    let state = |name: &str| {
        let i = rt.block_on(c.instance_get(name)).unwrap().value;
        serde_json::to_value(i.state)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    let wait_running = |name: &str| {
        let end = Instant::now() + Duration::from_secs(60);
        while state(name) != "running" {
            assert!(Instant::now() < end, "{name} does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let spec: InstanceCreate = serde_json::from_value(serde_json::json!({
        "name": "src", "vcpus": 1, "memory": format!("{memory}MiB"),
        "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=hlt"},
        "disks": [{"create": {"name": "src-root", "size": "64MiB", "format": "qcow2"}}],
        "start": true,
    }))
    .unwrap();
    rt.block_on(c.instance_create(&spec)).unwrap();
    wait_running("src");
    std::thread::sleep(Duration::from_millis(300));
    let mut paused = Vec::new();
    let mut saved = 0;
    for i in 0..runs {
        let s = rt
            .block_on(c.instance_snapshot_create(
                "src",
                &SnapshotCreate {
                    name: format!("s{i}"),
                    description: String::new(),
                    stop: false,
                },
            ))
            .unwrap();
        paused.push(s.paused_us as f64 / 1e3);
        saved = s.memory_saved;
    }
    println!(
        "kiln serve: snapshot of a {memory} MiB probe guest with a 64 MiB qcow2 disk, pause to resumed {:.2} ms \
         (median of {runs}, as the API reports it), memory saved {:.2} MiB",
        median(&mut paused),
        saved as f64 / (1 << 20) as f64
    );
    let restore = |name: &str, count: Option<u32>| {
        let t = Instant::now();
        let made = rt
            .block_on(c.instance_restore(&InstanceRestore {
                name: name.into(),
                description: String::new(),
                source: RestoreSource {
                    snapshot: "s0".into(),
                },
                count,
                fresh_mac: false,
                network_interfaces: Vec::new(),
                auto_start: false,
                start: true,
            }))
            .unwrap();
        for i in &made {
            wait_running(&i.name);
        }
        t.elapsed()
    };
    let mut api = Vec::new();
    for i in 0..runs {
        api.push(restore(&format!("r{i}"), None).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let times = |kind: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.contains(kind) && l.contains("running after"))
            .filter_map(|l| l.split("running after ").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .map(|us| us / 1e3)
            .collect()
    };
    let (mut cold, mut warm) = (times("(cold)"), times("(prepared shell)"));
    println!(
        "kiln serve: restore (POST /v1/instances with source.snapshot and start) to the instance running \
         {:.1} ms through the API (median of {runs}: HTTP, disk overlay, polling); inside the daemon, \
         restore to vCPUs running {:.2} ms cold ({} runs), {:.2} ms from the prepared shell ({} runs)",
        median(&mut api),
        if cold.is_empty() { f64::NAN } else { median(&mut cold) },
        cold.len(),
        if warm.is_empty() { f64::NAN } else { median(&mut warm) },
        warm.len(),
    );
    let before = rss_of(child.id());
    let took = restore("clone", Some(clones as u32));
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_of(child.id());
    let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / clones as f64 / 1024.0;
    println!(
        "kiln serve: {clones} clones in one request (count), all running after {:.0} ms ({:.0} clones/s); \
         daemon RSS per clone {:.0} KiB (anonymous {:.0} KiB, file-backed {:.0} KiB)",
        took.as_secs_f64() * 1e3,
        clones as f64 / took.as_secs_f64(),
        per(after.0, before.0),
        per(after.1, before.1),
        per(after.2, before.2),
    );
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Runs `kiln run --restore dir` on a pseudo-terminal, types a line, and times the process
/// from its start to the guest's echo of that line.
fn restore_process(dir: &Path, i: usize) -> Duration {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two fds it opens; the other arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: fresh fds from openpty, owned here.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--restore"])
        .arg(dir)
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    master.write_all(format!("cli{i}\r").as_bytes()).unwrap();
    let want = format!("PROBE-OK note cli{i}");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut took = None;
    for line in out.lines().map_while(Result::ok) {
        if line.contains(&want) {
            took = Some(t.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    took.expect("the restored guest answered")
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Firecracker's snapshot and restore of the probe guest (its API over a Unix socket).
fn firecracker_bench(fc: &Path, dir: &Path, memory: u64, runs: usize) {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    fn call(sock: &Path, method: &str, path: &str, body: &str) -> String {
        let mut s = UnixStream::connect(sock).expect("firecracker socket");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp.split_whitespace().nth(1).unwrap_or("").to_string();
        assert!(
            status.starts_with('2'),
            "firecracker {method} {path}: {resp}"
        );
        resp
    }
    fn spawn(fc: &Path, sock: &Path) -> std::process::Child {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(fc)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn firecracker");
        let end = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < end, "firecracker API socket");
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }
    let sock = dir.join("fc.sock");
    let mut child = spawn(fc, &sock);
    let kernel = probe_elf();
    call(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 probe=count"}}"#,
            kernel.display()
        ),
    );
    call(
        &sock,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {memory}}}"#),
    );
    call(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("PROBE-COUNT 1") {
        line.clear();
    }
    let mut times = Vec::new();
    for i in 0..runs {
        let (st, mem) = (
            dir.join(format!("fc{i}.state")),
            dir.join(format!("fc{i}.mem")),
        );
        let t = Instant::now();
        call(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        call(
            &sock,
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                st.display(),
                mem.display()
            ),
        );
        call(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "firecracker snapshot: pause to resumed {:.2} ms (median of {runs}); memory file {:.2} MiB on disk",
        median(&mut times),
        allocated(&dir.join("fc0.mem")) as f64 / (1 << 20) as f64
    );
    let mut restore = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut child = spawn(fc, &sock);
        call(
            &sock,
            "PUT",
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
                dir.join("fc0.state").display(),
                dir.join("fc0.mem").display()
            ),
        );
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = child.kill();
        let _ = child.wait();
    }
    println!(
        "firecracker restore: process start to resumed {:.2} ms (median of {runs})",
        median(&mut restore)
    );
}
