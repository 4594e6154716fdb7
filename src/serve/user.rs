//! `kiln serve --user`: runs as an unprivileged user, keeping only `CAP_NET_ADMIN` (to create
//! TAP devices). `/dev/kvm` is opened before the switch; the state and socket directories it
//! creates are given to the user.

use std::path::Path;

/// A user to run as.
pub struct Account {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Every group it is in (the primary one first).
    pub groups: Vec<u32>,
}

/// Looks `user` (a name or a uid) up in /etc/passwd and its groups in /etc/group.
pub fn lookup(user: &str) -> Result<Account, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    let (name, uid, gid) = passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<_> = l.split(':').collect();
            (f.len() >= 4).then(|| (f[0].to_string(), f[2].parse().ok(), f[3].parse().ok()))
        })
        .find_map(|(name, uid, gid)| {
            let (uid, gid): (u32, u32) = (uid?, gid?);
            (name == user || user.parse() == Ok(uid)).then_some((name, uid, gid))
        })
        .ok_or_else(|| format!("no user {user:?} in /etc/passwd"))?;
    let mut groups = vec![gid];
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for l in group.lines() {
        let f: Vec<_> = l.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
            if let Ok(g) = f[2].parse() {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
    }
    Ok(Account {
        name,
        uid,
        gid,
        groups,
    })
}

/// Creates `dir` (mode `mode`) if missing, and then gives it to `account`.
pub fn make_dir_for(dir: &Path, mode: u32, account: &Account) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", dir.display(), account.name))?;
    }
    Ok(())
}

/// `CAP_NET_ADMIN`.
const CAP_NET_ADMIN: u32 = 12;

/// Switches the process (one thread so far) to `account`, keeping `CAP_NET_ADMIN` only.
pub fn switch_to(account: &Account) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain credential system calls on the only thread of the process.
    unsafe {
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(os("PR_SET_KEEPCAPS"));
        }
        if libc::setgroups(account.groups.len(), account.groups.as_ptr()) != 0 {
            return Err(os("setgroups"));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(os("setresgid"));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(os("setresuid"));
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let keep = Data {
        effective: 1 << CAP_NET_ADMIN,
        permitted: 1 << CAP_NET_ADMIN,
        inheritable: 0,
    };
    let data = [
        keep,
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a version-3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os("capset"));
    }
    tracing::info!(
        "running as {} (uid {}, gid {}), keeping CAP_NET_ADMIN only",
        account.name,
        account.uid,
        account.gid
    );
    Ok(())
}
