//! `kiln run`: one VM in the foreground.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use vmm::{
    Console, DiskConfig, Exit, Host, KernelImage, NetConfig, RestoreOptions, Snapshot, Vm,
    VmConfig, VmHandle,
};

/// The probe guest (images/probe), built by build.rs.
pub static PROBE_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// Exit status when the VM fails.
const EXIT_FAILED: i32 = 1;
/// Exit status for arguments the VM cannot run with.
const EXIT_USAGE: i32 = 2;
/// Exit status after Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF vmlinux (PVH entry when it has the note) or a bzImage.
    /// Default: the probe guest built into kiln.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory: a number of MiB, or a size with a unit (512MiB, 2G).
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    memory: String,
    /// A virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,block_size=512|4096]; repeatable.
    /// Raw or qcow2.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-net NIC on a TAP device (created if missing): tap=NAME[,mac=MAC]; repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Give the guest KVM's in-kernel i8254 PIT. Linux with kvm-clock does not need one (it
    /// uses the TSC-deadline LAPIC timer); a kernel without kvm-clock may hang in its timer
    /// calibration without it. It makes the VM's teardown ~15 ms slower.
    #[arg(long, conflicts_with = "restore")]
    pit: bool,
    /// Continue the guest of the snapshot in DIR instead of booting. Its disks are the paths
    /// it had (as they are now) unless --disk gives others (in order, path= only; for a
    /// clone, a qcow2 overlay on the snapshot's disk-N copy), and its NICs its TAPs and MACs
    /// unless --net gives others.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory"])]
    restore: Option<PathBuf>,
    /// Where a snapshot goes on a signal: SIGUSR1 writes it (a new directory) and the guest
    /// goes on; SIGUSR2 writes it and stops the VM (exit status 0 once it is written).
    #[arg(long, value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
}

/// Splits `a=1,b=2` into pairs, refusing keys not in `known`.
fn key_values<'a>(spec: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    spec.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            if known.contains(&k) {
                Ok((k, v))
            } else {
                Err(format!(
                    "unknown key {k:?}; known keys: {}",
                    known.join(", ")
                ))
            }
        })
        .collect()
}

fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        serial: String::new(),
        backing_dirs: Vec::new(),
        block_size: 512,
    };
    for (k, v) in key_values(spec, &["path", "readonly", "serial", "block_size"])? {
        match k {
            "path" => disk.path = PathBuf::from(v),
            "readonly" => {
                disk.read_only = match v {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(format!("readonly={v}: use on or off")),
                }
            }
            "block_size" => {
                disk.block_size = v
                    .parse()
                    .map_err(|_| format!("block_size={v}: use 512 or 4096"))?;
            }
            _ => disk.serial = v.to_string(),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("path=FILE is required".into());
    }
    Ok(disk)
}

fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for (k, v) in key_values(spec, &["tap", "mac"])? {
        match k {
            "tap" => tap = Some(v.to_string()),
            _ => mac = Some(v.parse::<vmm::MacAddr>()?),
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or("tap=NAME is required")?,
        mac: mac.unwrap_or_else(vmm::MacAddr::random),
    })
}

pub fn run(args: RunArgs) -> i32 {
    let host = match Host::open() {
        Ok(h) => Arc::new(h),
        Err(e) => {
            eprintln!("kiln: {e}");
            return EXIT_FAILED;
        }
    };
    let vcpus = match u8::try_from(args.cpus) {
        Ok(n) => n,
        Err(_) => {
            let e = vmm::ConfigError::TooManyVcpus(args.cpus as usize, host.max_vcpus);
            eprintln!("kiln: {}", explain(&e.into()));
            return EXIT_USAGE;
        }
    };
    let memory = match vmm::parse_size(&args.memory, 1 << 20) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln: --memory: {e}");
            return EXIT_USAGE;
        }
    };
    let (terminal, console) = console();
    if let Some(dir) = &args.restore {
        return match restore(host, dir, &args, console) {
            Ok(vm) => run_vm(vm, terminal, args.snapshot_to),
            Err(code) => code,
        };
    }
    let disks = match args
        .disk
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kiln: --disk: {e}");
            return EXIT_USAGE;
        }
    };
    let nets = match args
        .net
        .iter()
        .map(|n| parse_net(n))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(n) => n,
        Err(e) => {
            eprintln!("kiln: --net: {e}");
            return EXIT_USAGE;
        }
    };
    let config = VmConfig {
        vcpus,
        memory,
        kernel: match args.kernel {
            Some(p) => KernelImage::File(p),
            None => KernelImage::Bytes(bytes::Bytes::from_static(PROBE_GUEST)),
        },
        initrd: args.initrd,
        cmdline: args.cmdline,
        disks,
        nets,
        pit: args.pit,
    };

    match Vm::new(host, config, console) {
        Ok(vm) => run_vm(vm, terminal, args.snapshot_to),
        Err(e) => {
            eprintln!("kiln: {}", explain(&e));
            EXIT_USAGE
        }
    }
}

/// The serial console: stdout, and stdin when it is a terminal.
fn console() -> (bool, Console) {
    let terminal = std::io::stdin().is_terminal();
    let input = if terminal {
        std::os::fd::AsFd::as_fd(&std::io::stdin())
            .try_clone_to_owned()
            .ok()
            .map(std::fs::File::from)
    } else {
        None
    };
    let console = Console {
        output: Box::new(std::io::stdout()),
        input,
    };
    (terminal, console)
}

/// A VM from the snapshot in `dir`, with the disks and NICs of `args` instead of its own.
fn restore(
    host: Arc<Host>,
    dir: &std::path::Path,
    args: &RunArgs,
    console: Console,
) -> Result<Vm, i32> {
    let snapshot = Snapshot::load(dir).map_err(|e| {
        eprintln!("kiln: --restore: {e}");
        EXIT_USAGE
    })?;
    let mut options = RestoreOptions::default();
    for spec in &args.disk {
        let path = key_values(spec, &["path"])
            .and_then(|kv| {
                kv.first()
                    .map(|(_, v)| PathBuf::from(v))
                    .ok_or("path=FILE is required".into())
            })
            .map_err(|e| {
                eprintln!("kiln: --disk with --restore takes path=FILE only: {e}");
                EXIT_USAGE
            })?;
        options.disks.push(Some(path));
    }
    for spec in &args.net {
        let net = parse_net(spec).map_err(|e| {
            eprintln!("kiln: --net: {e}");
            EXIT_USAGE
        })?;
        options.nets.push(Some(net));
    }
    if options.disks.len() > snapshot.config().disks.len()
        || options.nets.len() > snapshot.config().nets.len()
    {
        eprintln!("kiln: --restore: more --disk or --net than the snapshot's VM has");
        return Err(EXIT_USAGE);
    }
    Vm::restore(host, Arc::new(snapshot), &options, console).map_err(|e| {
        eprintln!("kiln: {}", explain(&e));
        EXIT_USAGE
    })
}

/// Runs the VM to its end; signals stop it (and, with `snapshot_to`, snapshot it).
fn run_vm(mut vm: Vm, terminal: bool, snapshot_to: Option<PathBuf>) -> i32 {
    // Signals go to one thread; vCPU threads never see them.
    let signals = block_signals(snapshot_to.is_some());
    let handle = vm.handle();
    let snapshotted = Arc::new(AtomicBool::new(false));
    let done = snapshotted.clone();
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: sigwait reads the set and writes the signal number.
        if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
            continue;
        }
        match (sig, &snapshot_to) {
            (libc::SIGUSR1, Some(dir)) => {
                take_snapshot(&handle, dir);
            }
            (libc::SIGUSR2, Some(dir)) => {
                // Paused from before the snapshot to the stop: the guest runs no further
                // than what the snapshot holds (its disks included).
                if handle.pause(std::time::Duration::from_secs(5)).is_ok()
                    && take_snapshot(&handle, dir)
                {
                    done.store(true, Ordering::Release);
                    handle.stop();
                } else {
                    handle.resume();
                }
            }
            _ => handle.stop(),
        }
    });
    let _raw = terminal.then(RawTerminal::enter).flatten();
    let result = vm.run();
    drop(_raw);
    match result {
        Ok(Exit::PowerOff) => 0,
        Ok(Exit::Stopped) if snapshotted.load(Ordering::Acquire) => {
            eprintln!("kiln: VM stopped after its snapshot");
            0
        }
        Ok(Exit::Stopped) => {
            eprintln!("kiln: VM stopped");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            EXIT_FAILED
        }
    }
}

/// Snapshots the VM into `dir` and says what it cost; false if it failed.
fn take_snapshot(handle: &VmHandle, dir: &std::path::Path) -> bool {
    match handle.snapshot(dir) {
        Ok(r) => {
            eprintln!(
                "kiln: snapshot written to {} (guest paused {:.1} ms; memory {:.1} of {} MiB written; disks {:.1} MiB in {:.1} ms)",
                dir.display(),
                r.paused_for.as_secs_f64() * 1e3,
                r.memory_written as f64 / (1 << 20) as f64,
                r.memory_total >> 20,
                r.disk_bytes as f64 / (1 << 20) as f64,
                r.disk_copy.as_secs_f64() * 1e3,
            );
            true
        }
        Err(e) => {
            eprintln!("kiln: snapshot: {e}");
            false
        }
    }
}

/// Maps configuration errors onto the flags that cause them.
fn explain(e: &vmm::VmError) -> String {
    use vmm::ConfigError as C;
    match e {
        vmm::VmError::Config(c) => {
            let flag = match c {
                C::NoVcpus | C::TooManyVcpus(..) => "--cpus",
                C::TooLittleMemory(_) | C::TooMuchMemory(..) => "--memory",
                C::KernelFile(..) | C::NotAKernel(_) => "--kernel",
                C::InitrdFile(..) => "--initrd",
                C::CmdlineTooLong(_) | C::CmdlineChars(_) => "--cmdline",
                C::Disk { .. } => "--disk",
                C::Net { .. } => "--net",
                C::TooManyDevices(_) => "--disk/--net",
            };
            format!("{flag}: {c}")
        }
        other => other.to_string(),
    }
}

/// Blocks the signals `kiln run` handles (stop; snapshot with `snapshots`) in every thread,
/// for one thread to take with `sigwait`.
fn block_signals(snapshots: bool) -> libc::sigset_t {
    let mut signals = vec![libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    if snapshots {
        signals.extend([libc::SIGUSR1, libc::SIGUSR2]);
    }
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The terminal in raw mode (no line editing or echo; Ctrl-C still signals), restored on drop.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_lflag |= libc::ISIG;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Some(Self(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}
