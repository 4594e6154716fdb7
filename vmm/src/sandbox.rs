//! The seccomp sandbox of `kiln serve`: each kind of thread runs under an allowlist of system
//! calls (built with `seccompiler`; NoNewPrivs set), installed by the thread itself when it
//! starts — except the API runtime's threads, which inherit the API filter from the main
//! thread (`kiln serve` installs it before starting them). Filters stack: a thread keeps
//! those of the thread that started it, so what a vCPU may do is its own list within its VM
//! thread's and the API runtime's.
//!
//! A call outside the list is not run: the thread gets `SIGSYS`, whose handler makes the call
//! fail with `EPERM`, writes a line to stderr and remembers the call for the thread
//! ([`take_refused`]). A vCPU or event loop that meets one fails its VM with the call named;
//! other VMs go on.
//!
//! The sandbox is off until [`enable`] (`kiln serve` enables it unless `--no-sandbox`; `kiln
//! run` does not).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The kinds of threads, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The API runtime and its blocking pool (tokio runs both on the same threads): sockets,
    /// files of the state directory, starting threads, building VMs.
    Api,
    /// A VM's own thread: builds each boot (KVM, memory, devices), starts its vCPUs and
    /// event loop, joins them.
    Vm,
    /// A VM's event loop: virtio queues (disk and TAP I/O), the console.
    EventLoop,
    /// A vCPU: `KVM_RUN` and the device accesses it traps.
    Vcpu,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static FILTERS: OnceLock<BTreeMap<ThreadKind, BpfProgram>> = OnceLock::new();
/// Calls refused so far (all threads).
static REFUSED_COUNT: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last call refused on this thread (-1: none).
    static REFUSED: Cell<i64> = const { Cell::new(-1) };
}

/// Calls every thread makes: memory, futexes, signals, time, thread start and exit, logging.
const BASE: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_restart_syscall,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // A thread started by a sandboxed one adds its own (narrower) filter: filters only stack.
    libc::SYS_seccomp,
];

/// Disk and TAP I/O on open files.
const FILE_IO: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_ioctl,
];

/// Waiting on many fds.
const EPOLL: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// Building a VM's boot: opening images, TAPs and KVM, eventfds, threads.
const BUILD: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fcntl,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_socket,
    libc::SYS_memfd_create,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_set_tid_address,
];

/// What the API runtime needs beyond building VMs: sockets, the state directory's files.
const API: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_socketpair,
    libc::SYS_pipe2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_utimensat,
    libc::SYS_getcwd,
    libc::SYS_sysinfo,
    libc::SYS_prlimit64,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_wait4,
];

fn allowlist(kind: ThreadKind) -> Vec<libc::c_long> {
    let parts: &[&[libc::c_long]] = match kind {
        ThreadKind::Vcpu => &[BASE, FILE_IO],
        ThreadKind::EventLoop => &[BASE, FILE_IO, EPOLL],
        ThreadKind::Vm => &[BASE, FILE_IO, EPOLL, BUILD],
        ThreadKind::Api => &[BASE, FILE_IO, EPOLL, BUILD, API],
    };
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

fn build(kind: ThreadKind) -> Result<BpfProgram, String> {
    let rules = allowlist(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("{e:?}"))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| format!("seccomp filter for {kind:?}: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("seccomp filter for {kind:?}: {e}"))
}

/// Builds every filter and installs the `SIGSYS` handler; from now on [`apply`] installs
/// filters. Call once, before the threads to sandbox start.
pub fn enable() -> Result<(), String> {
    let mut filters = BTreeMap::new();
    for kind in [
        ThreadKind::Api,
        ThreadKind::Vm,
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
    ] {
        filters.insert(kind, build(kind)?);
    }
    let _ = FILTERS.set(filters);
    install_sigsys_handler()?;
    ENABLED.store(true, Ordering::Release);
    Ok(())
}

/// True once [`enable`] succeeded.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Installs the filter of `kind` on the calling thread (and sets NoNewPrivs), when the
/// sandbox is enabled.
pub fn apply(kind: ThreadKind) -> Result<(), String> {
    if !is_enabled() {
        return Ok(());
    }
    let prog = FILTERS
        .get()
        .and_then(|f| f.get(&kind))
        .ok_or("the sandbox has no filters")?;
    seccompiler::apply_filter(prog).map_err(|e| format!("seccomp ({kind:?}): {e}"))
}

/// The system call last refused on this thread, if any (and forgets it).
pub fn take_refused() -> Option<i64> {
    let nr = REFUSED.with(|r| r.replace(-1));
    (nr >= 0).then_some(nr)
}

/// How many calls the sandbox refused so far, on every thread.
pub fn refused_count() -> u64 {
    REFUSED_COUNT.load(Ordering::Relaxed)
}

/// A system call's name, for the calls a refusal is most likely to name.
pub fn syscall_name(nr: i64) -> String {
    let known: &[(libc::c_long, &str)] = &[
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_open, "open"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_bpf, "bpf"),
        (libc::SYS_setuid, "setuid"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or_else(|| format!("#{nr}"), |(_, name)| (*name).to_string())
}

/// A test hook: when the environment has `KILN_TEST_FORBIDDEN_SYSCALL=1` and the sandbox is
/// on, makes a call no vCPU may make (`socket`), as a compromised device model would. Returns
/// the refusal's description, or `None` when the hook is off.
pub fn test_forbidden_call() -> Option<String> {
    if !is_enabled() || std::env::var_os("KILN_TEST_FORBIDDEN_SYSCALL").is_none_or(|v| v != "1") {
        return None;
    }
    // SAFETY: a plain socket() call; the fd, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the fd just made.
        unsafe { libc::close(fd) };
    }
    take_refused().map(refusal)
}

/// How a refusal is told: `the sandbox refused the system call socket (#41)`.
pub fn refusal(nr: i64) -> String {
    format!(
        "the sandbox refused the system call {} (#{nr})",
        syscall_name(nr)
    )
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: installs a handler that only touches a thread-local Cell, an atomic, write(2)
    // and the interrupted context's registers: async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in a `SIGSYS` siginfo (x86-64: after signo, errno, code, padding
/// and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo and the interrupted thread's ucontext.
    let nr = unsafe { *(info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>() } as i64;
    let _ = REFUSED.try_with(|r| r.set(nr));
    REFUSED_COUNT.fetch_add(1, Ordering::Relaxed);
    let prefix = b"kiln: sandbox: refused system call #";
    let mut msg = [0u8; 64];
    msg[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 20];
    let (mut d, mut n) = (0, nr.unsigned_abs());
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = prefix.len();
    while d > 0 {
        d -= 1;
        msg[len] = digits[d];
        len += 1;
    }
    msg[len] = b'\n';
    let msg = &msg[..=len];
    // SAFETY: write(2) of a stack buffer is async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `ctx` is this thread's interrupted context: the call returns -EPERM.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_narrower_kinds_allow_less() {
        for kind in [
            ThreadKind::Api,
            ThreadKind::Vm,
            ThreadKind::EventLoop,
            ThreadKind::Vcpu,
        ] {
            build(kind).unwrap();
        }
        let vcpu = allowlist(ThreadKind::Vcpu);
        let api = allowlist(ThreadKind::Api);
        assert!(vcpu.iter().all(|c| api.contains(c)));
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_mount,
        ] {
            assert!(!api.contains(&forbidden));
        }
        assert!(!vcpu.contains(&libc::SYS_socket) && !vcpu.contains(&libc::SYS_openat));
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
    }
}
