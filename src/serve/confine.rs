//! Landlock for `kiln serve`: the process may open files only in its state directory, its
//! socket's directory, the image directories (read), `/dev/kvm` and `/dev/net/tun`, the token
//! file (read), and `/proc`, `/sys` and a few devices (read). Applied before any thread
//! starts, so every thread is held to it.

use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// What the process may reach.
pub struct Allowed {
    /// Read and write everything beneath (the state directory, the socket's directory).
    pub full: Vec<PathBuf>,
    /// Read beneath (image directories, the token file).
    pub read: Vec<PathBuf>,
}

/// Devices the VMs need, read and write (and their ioctls).
const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/null", "/dev/urandom"];
/// Read only: thread and cgroup information, network interface names.
const SYSTEM_READ: &[&str] = &["/proc", "/sys"];

/// Restricts the calling thread (and every thread it starts from now on) to `allowed`.
/// Returns whether the kernel enforces it fully, partly or not at all (no Landlock).
pub fn restrict(allowed: &Allowed) -> Result<RulesetStatus, String> {
    let abi = ABI::V5;
    let existing = |paths: Vec<PathBuf>| -> Vec<PathBuf> {
        paths.into_iter().filter(|p| p.exists()).collect()
    };
    let devices = existing(DEVICES.iter().map(PathBuf::from).collect());
    let system = existing(SYSTEM_READ.iter().map(PathBuf::from).collect());
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(&allowed.full, AccessFs::from_all(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(allowed.read.clone()),
            AccessFs::from_read(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &devices,
            AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev,
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(&system, AccessFs::from_read(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}

/// A test hook: with `KILN_TEST_OPEN_AFTER_SANDBOX=PATH`, tries to open PATH for reading and
/// logs what happened (the tests check that a file outside the allowed directories cannot be
/// opened by the daemon itself).
pub fn self_test() {
    let Some(path) = std::env::var_os("KILN_TEST_OPEN_AFTER_SANDBOX") else {
        return;
    };
    let path = Path::new(&path);
    match std::fs::File::open(path) {
        Ok(_) => tracing::warn!("sandbox self-test: opened {}", path.display()),
        Err(e) => tracing::warn!("sandbox self-test: cannot open {}: {e}", path.display()),
    }
}
