//! API benchmark: a real `kiln serve` (the built binary) on a temporary state directory, driven
//! over its Unix socket by the client crate (kept-alive HTTP/1 connections).
//!
//!     cargo bench --bench api -- [--requests N] [--runs N] [--vms N] [--vm-pool N]
//!     cargo bench --bench api -- --sandbox-compare [--runs N]
//!
//!     cargo bench --bench api -- --idle N
//!     cargo bench --bench api -- --startup [--runs N] [--requests N]
//!                                [--firecracker PATH] [--cloud-hypervisor PATH]
//!
//! `--startup` compares the APIs themselves, `kiln serve` beside each peer given (no VM in
//! any): process start → the first 200 to each one's cheapest GET (`/v1`, Firecracker's `/`,
//! Cloud Hypervisor's `/api/v1/vmm.ping`), median of `--runs` fresh processes, interleaved;
//! then that GET's latency on kept-alive connections at 1 and 32 concurrent clients,
//! `--requests` each, with the count of requests refused or failed. One plain HTTP/1.1
//! client (`common::peers::RawHttp`) for all.
//!
//! `--idle N` measures only what idle guests cost the daemon: N probe guests (1 vCPU, 128 MiB,
//! `probe=hlt`) started one after the other in one fresh `kiln serve`, then its RSS, PSS,
//! threads and open fds against the empty daemon, per guest; and the time to delete them all.
//!
//! `--sandbox-compare` measures only what the sandbox (seccomp per thread, Landlock) costs a
//! VM: start → banner (median of `--runs`) and RSS per idle guest (10 guests), with the
//! sandbox and with `--no-sandbox`, each on a fresh server.
//!
//! 1. Latency of `GET /v1/instances/{id}` on kept-alive HTTP/1 connections, at 1 and 64
//!    concurrent clients, `--requests` (5000) each: p50, p99 and the request rate.
//! 2. `POST …/actions {"action":"start"}` → the probe banner on the console websocket
//!    (median, min, max of `--runs`, 20), a force stop between runs.
//! 3. RSS of `kiln serve` (VmRSS) with 0, 1, 10 and 20 idle running 128 MiB probe guests
//!    (`probe=hlt`), and the overhead per extra guest.
//! 4. `--vms` (50) instances in a row created with `"start": true`, each until its banner is in
//!    `GET …/console`: instances per second; then they are deleted (`?force=true`).
//!
//! `--vm-pool N` runs the server with `--vm-pool N` (VMs built ahead of starts).
//!
//! Figures only: nothing here asserts a time.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use client::{Bytes, Client, Method};
use futures_util::StreamExt;
use serde_json::{json, Value};

use common::{arg, Serve, BANNER};

/// A client whose HTTP/1 connection is kept alive between requests.
struct Conn {
    client: Client,
}

impl Conn {
    async fn open(socket: &Path) -> Conn {
        let client = Client::unix(socket);
        // The connection is made now, not in the first timed request.
        client.server_info().await.expect("connect");
        Conn { client }
    }

    async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> (u16, Bytes) {
        let mut req = self.client.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let reply = req.send().await.expect("request");
        (reply.status.as_u16(), reply.body)
    }

    async fn json(&mut self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let (status, bytes) = self.call(method, path, body).await;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status < 300, "{path}: {status} {v}");
        v
    }
}

fn probe_instance(name: &str, cmds: &str, start: bool) -> Value {
    json!({"name": name, "vcpus": 1, "memory": "128MiB", "start": start,
        "boot": {"kernel": "kiln-probe", "cmdline": format!("console=ttyS0 probe={cmds}")}})
}

/// Creates and starts `n` probe guests `{prefix}-0`… (`probe=hlt`) one after the other, each
/// until `until` is in its console.
async fn start_probes(c: &mut Conn, prefix: &str, n: usize, until: &str) {
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        c.json(
            Method::POST,
            "/v1/instances",
            Some(&probe_instance(&name, "hlt", true)),
        )
        .await;
        wait_console(c, &name, until, 1).await;
    }
}

/// Deletes `{prefix}-0`… `{prefix}-{n-1}` (forced), one after the other.
async fn delete_all(c: &mut Conn, prefix: &str, n: usize) {
    for i in 0..n {
        c.json(
            Method::DELETE,
            &format!("/v1/instances/{prefix}-{i}?force=true"),
            None,
        )
        .await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Waits until the console of `name` shows `what` at least `n` times; polls every 2 ms.
async fn wait_console(c: &mut Conn, name: &str, what: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, text) = c
            .call(Method::GET, &format!("/v1/instances/{name}/console"), None)
            .await;
        if String::from_utf8_lossy(&text).matches(what).count() >= n {
            return;
        }
        assert!(Instant::now() < end, "{name}: no {what:?} on the console");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 1. GET latency at `clients` concurrent connections of `requests` each.
async fn latency(
    socket: &Path,
    id: &str,
    clients: usize,
    requests: usize,
) -> (Vec<Duration>, Duration) {
    let path = format!("/v1/instances/{id}");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (socket, path, barrier) = (socket.to_path_buf(), path.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&socket).await;
            for _ in 0..50 {
                c.call(Method::GET, &path, None).await;
            }
            barrier.wait().await;
            let mut lat = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let (status, _) = c.call(Method::GET, &path, None).await;
                lat.push(t.elapsed());
                assert_eq!(status, 200);
            }
            lat
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut all = Vec::with_capacity(clients * requests);
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let wall = start.elapsed();
    all.sort();
    (all, wall)
}

/// 2. start → banner on the websocket, `runs` times.
async fn start_to_banner(socket: &Path, c: &mut Conn, runs: usize) -> Vec<Duration> {
    c.json(
        Method::POST,
        "/v1/instances",
        Some(&probe_instance("boot", "hlt", false)),
    )
    .await;
    let mut ws = Client::unix(socket)
        .instance_console_stream("boot")
        .await
        .expect("console websocket");
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (status, body) = c
            .call(
                Method::POST,
                "/v1/instances/boot/actions",
                Some(&json!({"action": "start"})),
            )
            .await;
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(m))) => {
                    seen.extend_from_slice(&m.into_data());
                    if String::from_utf8_lossy(&seen).contains(BANNER) {
                        break;
                    }
                }
                other => panic!("console websocket ended: {other:?}"),
            }
        }
        out.push(t.elapsed());
        // The banner can come before the VM reports its boot: stop once it is `running`.
        while c.json(Method::GET, "/v1/instances/boot", None).await["state"] != "running" {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        c.json(
            Method::POST,
            "/v1/instances/boot/actions?wait=true",
            Some(&json!({"action": "stop", "force": true})),
        )
        .await;
    }
    c.json(Method::DELETE, "/v1/instances/boot?force=true", None)
        .await;
    out.sort();
    out
}

/// Start → banner (sorted) and RSS per idle guest (KiB, over 10 guests) of a fresh server
/// started with `extra`.
fn sandbox_case(rt: &tokio::runtime::Runtime, extra: &[&str], runs: usize) -> (Vec<Duration>, f64) {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(dir.path(), Stdio::null(), extra);
    let socket = serve.socket.clone();
    rt.block_on(async {
        let mut c = Conn::open(&socket).await;
        let boots = start_to_banner(&socket, &mut c, runs).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = serve.rss_kib();
        for i in 0..10 {
            let name = format!("idle-{i}");
            c.json(
                Method::POST,
                "/v1/instances",
                Some(&probe_instance(&name, "hlt", true)),
            )
            .await;
            wait_console(&mut c, &name, "PROBE-OK hlt", 1).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_vm = (serve.rss_kib() as f64 - before as f64) / 10.0;
        (boots, per_vm)
    })
}

fn sandbox_compare(runs: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!();
    println!("the sandbox's cost per VM: start → banner over {runs} runs, RSS per idle 128 MiB probe guest (10 guests)");
    println!(
        "{:>12} {:>12} {:>10} {:>10} {:>14}",
        "sandbox", "median ms", "min ms", "max ms", "RSS/VM KiB"
    );
    for (label, extra) in [("on", &[][..]), ("off", &["--no-sandbox"][..])] {
        let (boots, per_vm) = sandbox_case(&rt, extra, runs);
        println!(
            "{:>12} {:>12.2} {:>10.2} {:>10.2} {:>14.0}",
            label,
            ms(boots[boots.len() / 2]),
            ms(boots[0]),
            ms(*boots.last().unwrap()),
            per_vm
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("the API benchmark boots guests and needs /dev/kvm");
    if common::has(&args, "--idle") {
        idle(arg(&args, "--idle", 1000usize).max(1));
        return;
    }
    if common::has(&args, "--startup") {
        startup(
            &args,
            arg(&args, "--runs", 20usize).max(1),
            arg(&args, "--requests", 5000usize).max(1),
        );
        return;
    }
    if common::has(&args, "--sandbox-compare") {
        sandbox_compare(arg(&args, "--runs", 20usize).max(1));
        return;
    }
    let requests = arg(&args, "--requests", 5000usize);
    let runs = arg(&args, "--runs", 20usize).max(1);
    let vms = arg(&args, "--vms", 50usize).max(1);
    let pool = arg(&args, "--vm-pool", 0usize).to_string();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(dir.path(), Stdio::inherit(), &["--vm-pool", &pool]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = serve.socket.clone();
    rt.block_on(async {
        let mut c = Conn::open(&socket).await;

        // 3. RSS with 0, 1, 10, 20 idle guests (a fresh server first).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut rss = vec![(0usize, serve.rss_kib())];
        let mut running = 0;
        for target in [1usize, 10, 20] {
            while running < target {
                let name = format!("idle-{running}");
                c.json(
                    Method::POST,
                    "/v1/instances",
                    Some(&probe_instance(&name, "hlt", true)),
                )
                .await;
                wait_console(&mut c, &name, "PROBE-OK hlt", 1).await;
                running += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss.push((target, serve.rss_kib()));
        }
        delete_all(&mut c, "idle", running).await;

        // 4. VMs created and started to their banner, in a row.
        let t = Instant::now();
        start_probes(&mut c, "vm", vms, BANNER).await;
        let create_wall = t.elapsed();
        let rss_many = serve.rss_kib();
        let t = Instant::now();
        delete_all(&mut c, "vm", vms).await;
        let delete_wall = t.elapsed();

        // 1. GET latency, on a running instance.
        let inst = c
            .json(
                Method::POST,
                "/v1/instances",
                Some(&probe_instance("lat", "hlt", true)),
            )
            .await;
        let id = inst["id"].as_str().expect("id").to_string();
        wait_console(&mut c, "lat", "PROBE-OK hlt", 1).await;
        let mut lat = Vec::new();
        for clients in [1usize, 64] {
            let (all, wall) = latency(&socket, &id, clients, requests).await;
            lat.push((clients, all, wall));
        }
        c.json(Method::DELETE, "/v1/instances/lat?force=true", None)
            .await;

        // 2. start → banner.
        let boots = start_to_banner(&socket, &mut c, runs).await;

        println!();
        println!("GET /v1/instances/{{id}}, kept-alive HTTP/1 over the Unix socket, {requests} requests per client");
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>12}",
            "clients", "p50 µs", "p99 µs", "max µs", "requests/s"
        );
        for (clients, all, wall) in &lat {
            println!(
                "{:>8} {:>10.0} {:>10.0} {:>10.0} {:>12.0}",
                clients,
                us(percentile(all, 0.50)),
                us(percentile(all, 0.99)),
                us(*all.last().unwrap()),
                all.len() as f64 / wall.as_secs_f64()
            );
        }
        println!();
        println!("POST …/actions start → probe banner on the console websocket, {runs} runs");
        println!(
            "{:>10} {:>10} {:>10}",
            "median ms", "min ms", "max ms"
        );
        println!(
            "{:>10.1} {:>10.1} {:>10.1}",
            ms(percentile(&boots, 0.5)),
            ms(boots[0]),
            ms(*boots.last().unwrap())
        );
        println!();
        println!("RSS of kiln serve (VmRSS) with idle running 128 MiB probe guests (probe=hlt)");
        println!("{:>7} {:>9} {:>20}", "guests", "RSS MiB", "MiB per extra guest");
        for (i, (n, kib)) in rss.iter().enumerate() {
            let per = if i == 0 {
                "-".to_string()
            } else {
                let (n0, k0) = rss[i - 1];
                format!("{:.2}", (*kib as f64 - k0 as f64) / 1024.0 / (n - n0) as f64)
            };
            println!("{:>7} {:>9.1} {:>20}", n, *kib as f64 / 1024.0, per);
        }
        let (n_last, k_last) = *rss.last().unwrap();
        println!(
            "overall: {:.2} MiB per guest (0 → {n_last})",
            (k_last as f64 - rss[0].1 as f64) / 1024.0 / n_last as f64
        );
        println!();
        println!("{vms} instances in a row: POST /v1/instances {{\"start\": true}} → banner in GET …/console");
        println!(
            "{:>10} {:>14} {:>12} {:>16} {:>18}",
            "total s", "instances/s", "ms each", "RSS after MiB", "delete all s"
        );
        println!(
            "{:>10.2} {:>14.1} {:>12.1} {:>16.1} {:>18.2}",
            create_wall.as_secs_f64(),
            vms as f64 / create_wall.as_secs_f64(),
            ms(create_wall) / vms as f64,
            rss_many as f64 / 1024.0,
            delete_wall.as_secs_f64()
        );
    });
    drop(serve);
}

/// RSS and PSS (KiB), threads and open fds of a process.
fn footprint(pid: u32) -> (u64, u64, u64, u64) {
    let field = |file: &str, name: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (
        field("status", "VmRSS:"),
        field("smaps_rollup", "Pss:"),
        field("status", "Threads:"),
        fds,
    )
}

/// `--idle N`: the daemon's footprint with N idle guests.
fn idle(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), Stdio::null());
    let pid = serve.pid();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Conn::open(&serve.socket).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let empty = footprint(pid);
        let t = Instant::now();
        start_probes(&mut c, "idle", n, "PROBE-OK hlt").await;
        let started = t.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let full = footprint(pid);
        let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n as f64;
        println!(
            "{n} idle guests started one after the other in {:.1} s ({:.0}/s)",
            started.as_secs_f64(),
            n as f64 / started.as_secs_f64()
        );
        println!(
            "kiln serve empty: RSS {:.1} MiB, PSS {:.1} MiB, {} threads, {} fds",
            empty.0 as f64 / 1024.0,
            empty.1 as f64 / 1024.0,
            empty.2,
            empty.3
        );
        println!(
            "with {n} idle guests: RSS {:.1} MiB, PSS {:.1} MiB, {} threads, {} fds",
            full.0 as f64 / 1024.0,
            full.1 as f64 / 1024.0,
            full.2,
            full.3
        );
        println!(
            "per idle guest: RSS {:.3} MiB, PSS {:.3} MiB, {:.2} threads, {:.2} fds",
            per(empty.0, full.0) / 1024.0,
            per(empty.1, full.1) / 1024.0,
            per(empty.2, full.2),
            per(empty.3, full.3)
        );
        let t = Instant::now();
        delete_all(&mut c, "idle", n).await;
        println!(
            "deleted (forced) one after the other in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    });
}

/// One VMM's API under `--startup`: how to start it on a socket and what to GET.
struct ApiSubject {
    name: &'static str,
    spawn: Box<dyn Fn(&Path) -> std::process::Child>,
    path: &'static str,
}

/// `--startup`: API start-up and GET latency of `kiln serve` and the peers.
fn startup(args: &[String], runs: usize, requests: usize) {
    use common::peers::{time_to_api, RawHttp};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut subjects = vec![ApiSubject {
        name: "kiln serve",
        spawn: Box::new(move |socket: &Path| {
            let _ = std::fs::remove_file(socket);
            std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["serve", "--socket"])
                .arg(socket)
                .arg("--state-dir")
                .arg(&state)
                .env("KILN_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn kiln serve")
        }),
        path: "/v1",
    }];
    for peer in common::peers::from_args(args) {
        let path = peer.ping_path();
        let name = peer.name();
        subjects.push(ApiSubject {
            name,
            spawn: Box::new(move |socket: &Path| peer.spawn_api(socket)),
            path,
        });
    }
    let stop = |mut child: std::process::Child| {
        // SIGTERM first: kiln serve removes its socket and lock on the way out.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Start-up, interleaved.
    let mut starts: Vec<Vec<Duration>> = subjects.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, s) in subjects.iter().enumerate() {
            let socket = dir.path().join(format!("api-{i}.sock"));
            let (took, child) = time_to_api(|| (s.spawn)(&socket), &socket, s.path);
            starts[i].push(took);
            stop(child);
        }
    }
    for v in &mut starts {
        v.sort();
    }
    println!("process start → first 200 to its cheapest GET, median of {runs} fresh processes; then that GET on kept-alive connections, {requests} per client");
    println!(
        "{:18} {:>17} {:>9} {:>10} {:>8} {:>11} {:>8} {:>12}",
        "subject", "GET", "start ms", "1: p50 µs", "p99 µs", "32: p50 µs", "p99 µs", "refused"
    );
    for (i, s) in subjects.iter().enumerate() {
        let socket = dir.path().join(format!("api-{i}.sock"));
        let (_, child) = time_to_api(|| (s.spawn)(&socket), &socket, s.path);
        let mut row = Vec::new();
        let mut refused = 0usize;
        for clients in [1usize, 32] {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
            let threads: Vec<_> = (0..clients)
                .map(|_| {
                    let (socket, path, barrier) = (socket.clone(), s.path, barrier.clone());
                    std::thread::spawn(move || {
                        let mut lat = Vec::with_capacity(requests);
                        let mut failed = 0usize;
                        let conn = RawHttp::connect(&socket);
                        barrier.wait();
                        let Ok(mut c) = conn else {
                            return (lat, requests);
                        };
                        for _ in 0..requests {
                            let t = Instant::now();
                            match c.get(path) {
                                Ok(200) => lat.push(t.elapsed()),
                                Ok(_) => failed += 1,
                                // The server closed the connection: the rest are refused.
                                Err(_) => {
                                    let done = lat.len() + failed;
                                    return (lat, failed + requests - done);
                                }
                            }
                        }
                        (lat, failed)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in threads {
                let (lat, failed) = t.join().expect("client thread");
                all.extend(lat);
                if clients > 1 {
                    refused += failed;
                }
            }
            all.sort();
            row.push(if all.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                (us(percentile(&all, 0.5)), us(percentile(&all, 0.99)))
            });
        }
        stop(child);
        println!(
            "{:18} {:>17} {:>9.2} {:>10.0} {:>8.0} {:>11.0} {:>8.0} {:>12}",
            s.name,
            s.path,
            ms(starts[i][runs / 2]),
            row[0].0,
            row[0].1,
            row[1].0,
            row[1].1,
            format!("{refused}/{}", 32 * requests)
        );
    }
}
