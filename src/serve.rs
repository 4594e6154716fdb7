//! `kiln serve`: the host daemon — every instance of the host under the REST API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::{AppState, HostInfo, Metrics, ServerInfo};
use clap::Args;
use control::Manager;
use vmm::Host;

use crate::run::PROBE_GUEST;

mod confine;
mod user;

#[derive(Args)]
pub struct ServeArgs {
    /// Unix socket to serve the API on (mode 0660; a stale socket is replaced)
    /// [env: KILN_SOCKET] [default: /run/kiln/kiln.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where instance definitions are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln")]
    state_dir: PathBuf,
    /// Also serve on TCP (needs --token-file; every request needs the bearer token).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// File holding the bearer token for --listen.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A directory images may be registered from by path (`POST /v1/images`); repeatable.
    #[arg(long = "image-dir", value_name = "DIR")]
    image_dirs: Vec<PathBuf>,
    /// How log lines are written: text (plain when stderr is not a terminal), or json (one
    /// object per line, for log shippers). `KILN_LOG` sets the level (info by default).
    #[arg(long, value_enum, default_value_t)]
    log_format: crate::logging::LogFormat,
    /// Connections the TCP listener serves at once (more wait in the kernel's backlog; the
    /// Unix socket has a limit of its own).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (idle connections close after it).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    header_timeout: u64,
    /// Serve TCP with TLS: the certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Run as this user (a name or uid), keeping only CAP_NET_ADMIN (for TAPs): /dev/kvm is
    /// opened first; the state and socket directories are given to the user when kiln creates
    /// them, and must be writable by it otherwise.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Group of the Unix socket (a name or a gid): its members may use the API.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Run without the sandbox (seccomp filters per thread): for debugging only.
    #[arg(long)]
    no_sandbox: bool,
    /// Seconds guests that listen to the ACPI power button get to power off when kiln serve
    /// stops (SIGTERM, SIGINT); then they are stopped hard.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Seconds a request body may send nothing before the request fails.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    body_timeout: u64,
    /// VMs to keep built ahead (a KVM VM with its guest memory registered, for the memory
    /// size of the last instance started): a start takes one and skips KVM's memory
    /// registration (milliseconds). Each costs a KVM VM and no guest RAM until it is used.
    #[arg(long, value_name = "N", default_value_t = 0)]
    vm_pool: usize,
}

impl ServeArgs {
    /// The bounds of the TCP listener and of the Unix socket: the socket, whose clients are
    /// trusted and hold event streams and consoles open, takes up to 1 024 connections; TCP
    /// `--max-connections`; neither more than a quarter of the open-files limit.
    fn limits(&self, fd_limit: u64) -> (api::Limits, api::Limits) {
        let quarter = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX).max(16);
        let tcp = api::Limits {
            max_connections: self.max_connections.min(quarter),
            header_timeout: std::time::Duration::from_secs(self.header_timeout.max(1)),
            body_idle_timeout: std::time::Duration::from_secs(self.body_timeout.max(1)),
        };
        let unix = api::Limits {
            max_connections: UNIX_CONNECTIONS.min(quarter),
            ..tcp
        };
        (tcp, unix)
    }
}

/// Limits the files the process may open (Landlock) to what `kiln serve` needs: the state
/// directory and the socket's directory (made here if missing), the image directories and
/// the token file (read), `/dev/kvm` and `/dev/net/tun`.
fn confine_files(args: &ServeArgs, socket: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let socket_dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for (dir, mode) in [(&args.state_dir, 0o700), (&socket_dir, 0o755)] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut read = args.image_dirs.clone();
    read.extend(args.token_file.clone());
    read.extend(args.tls_cert.clone());
    read.extend(args.tls_key.clone());
    let allowed = confine::Allowed {
        full: vec![args.state_dir.clone(), socket_dir],
        read,
    };
    match confine::restrict(&allowed)? {
        landlock::RulesetStatus::FullyEnforced => {}
        other => tracing::warn!("Landlock is {other:?} on this kernel: file access is not limited"),
    }
    Ok(())
}

/// The gid of a group given by name (from /etc/group) or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(|e| format!("/etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("no group named {group:?}"))
}

/// Connections the Unix socket serves at once (fewer when the open-files limit is low).
const UNIX_CONNECTIONS: usize = 1024;

/// Raises the soft limit of open files to the hard one (the listeners are bounded, so what
/// the fds are for is VMs: disks, TAPs, eventfds, KVM); returns the limit.
fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!("cannot raise the open-files limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// KVM's facts (`Host::open`: its CPUID and MSR lists take ~0.5 ms here), read on a helper
/// thread while the main thread builds the sandbox. The thread starts before any filter;
/// [`HostReader::get`] joins it (before the user switch when there is one: KVM is opened with
/// the daemon's first credentials either way).
struct HostReader {
    thread: Option<std::thread::JoinHandle<Result<Host, vmm::host::HostError>>>,
    host: Option<Arc<Host>>,
}

impl HostReader {
    fn start() -> HostReader {
        let thread = std::thread::Builder::new()
            .name("kiln-host".into())
            .spawn(Host::open)
            .ok();
        HostReader { thread, host: None }
    }

    fn get(&mut self) -> Result<Arc<Host>, String> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let opened = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "reading the host's KVM panicked".to_string())?,
            None => Host::open(),
        };
        let host = Arc::new(opened.map_err(|e| e.to_string())?);
        self.host = Some(host.clone());
        Ok(host)
    }
}

impl Drop for HostReader {
    /// A start that fails before [`HostReader::get`] still joins the thread (it is short).
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `kiln serve`; `socket` is where to serve when `--socket` is not given. Returns the
/// exit status.
pub fn serve(mut args: ServeArgs, socket: PathBuf) -> i32 {
    crate::logging::init_daemon(args.log_format);
    let socket = args.socket.take().unwrap_or(socket);
    if args.listen.is_some() && args.token_file.is_none() {
        eprintln!("kiln: --listen needs --token-file FILE (TCP is never served without a token)");
        return 2;
    }
    let (tcp_limits, unix_limits) = args.limits(raise_fd_limit());
    let shutdown_timeout = args.shutdown_timeout;
    // Disk copies, imports and exports, VM builds and teardowns run on the blocking pool: it is
    // bounded, as operations are (control::operations::POOL).
    // Definitions and disk images are private to the daemon's user (0640, directories 0750).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o027));
    let socket_gid = match args.socket_group.as_deref().map(group_id).transpose() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("kiln: --socket-group: {e}");
            return 2;
        }
    };
    let mut host = HostReader::start();
    if args.user.is_some() {
        if let Err(e) = host.get() {
            eprintln!("kiln: {e}");
            return 1;
        }
    }
    if let Some(name) = &args.user {
        let switched = user::lookup(name).and_then(|account| {
            let socket_dir = match socket.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            user::make_dir_for(&args.state_dir, 0o700, &account)?;
            user::make_dir_for(&socket_dir, 0o755, &account)?;
            user::switch_to(&account)
        });
        if let Err(e) = switched {
            eprintln!("kiln: --user {name}: {e}");
            return 1;
        }
    }
    if args.no_sandbox {
        tracing::warn!("--no-sandbox: threads run without seccomp filters");
    } else if let Err(e) = vmm::sandbox::enable() {
        eprintln!("kiln: cannot set up the sandbox: {e} (--no-sandbox runs without it)");
        return 1;
    }
    if !args.no_sandbox {
        if let Err(e) = confine_files(&args, &socket) {
            eprintln!("kiln: cannot set up the sandbox: {e} (--no-sandbox runs without it)");
            return 1;
        }
    }
    confine::self_test();
    // The API filter goes on the main thread before the runtime's threads exist: they, its
    // blocking pool and the VM threads they start inherit it (filters stack), so each thread
    // has it once and only the main thread pays for loading it (~0.3 ms per load here).
    if let Err(e) = vmm::sandbox::apply(vmm::sandbox::ThreadKind::Api) {
        eprintln!("kiln: {e}");
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    let host = match host.get() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    let info = ServerInfo {
        host: HostInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory: host.memory,
        },
        features: vec![
            "virtio-blk".into(),
            "virtio-net".into(),
            "probe-guest".into(),
        ],
    };
    let manager = match Manager::load(
        host,
        &args.state_dir,
        &args.image_dirs,
        bytes::Bytes::from_static(PROBE_GUEST),
        rt.handle().clone(),
    ) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    // The state directory (locked, swept, loaded) first: a second daemon on it stops here.
    // Then the listeners (TCP, whose token file may be refused, before the socket file is
    // made): a bad token file or a busy address stops kiln before any instance (auto_start)
    // is touched.
    let listeners = rt.block_on(async {
        let tcp = match (args.listen, &args.token_file) {
            (Some(addr), Some(token)) => Some({
                let mut server = api::TcpServer::bind(addr, token)
                    .await
                    .map_err(|e| e.to_string())?
                    .with_limits(tcp_limits);
                if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                    server = server.with_tls(cert, key).map_err(|e| e.to_string())?;
                }
                server
            }),
            _ => None,
        };
        let unix = api::UnixServer::bind_with_group(&socket, socket_gid)
            .await
            .map_err(|e| e.to_string())?
            .with_limits(unix_limits);
        Ok::<_, String>((unix, tcp))
    });
    let (unix, tcp) = match listeners {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    manager.start_auto();
    if args.vm_pool > 0 {
        manager.keep_vm_shells(args.vm_pool);
    }
    let metrics = Metrics::new();
    metrics.register_vmm(&manager);
    let state = AppState::new(info, metrics).with_manager(manager.clone());
    let result = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        crate::logging::started(
            &socket,
            tcp.as_ref().map(|t| t.local_addr()),
            &args.state_dir,
            &state,
        );
        let mut tasks = vec![tokio::spawn(
            unix.serve(api::router(state.clone()), shutdown(stop_rx.clone())),
        )];
        if let Some(tcp) = tcp {
            tasks.push(tokio::spawn(
                tcp.serve(api::router(state), shutdown(stop_rx)),
            ));
        }
        api::shutdown_signal().await;
        let _ = stop_tx.send(true);
        // Open streams (console, events) would hold a graceful shutdown forever: give
        // requests in flight a few seconds, then go.
        for t in tasks {
            let Ok(r) = tokio::time::timeout(std::time::Duration::from_secs(5), t).await else {
                tracing::info!("connections still open after 5 s; closing them");
                break;
            };
            if let Ok(Err(e)) = r {
                tracing::warn!("listener: {e}");
            }
        }
        Ok::<_, String>(())
    });
    // Blocking waits (event and console streams) are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    manager.shutdown(std::time::Duration::from_secs(shutdown_timeout));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: {e}");
            1
        }
    }
}
