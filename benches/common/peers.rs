//! Firecracker and Cloud Hypervisor beside Kiln: given by path on the bench's command line
//! (`--firecracker PATH`, `--cloud-hypervisor PATH`); the benches never build, fetch or
//! vendor them. Each boots the same probe guest with its own CLI, and its API is driven over
//! its own Unix socket with the same plain HTTP/1.1 client as Kiln's (`RawHttp`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::strings;

/// Which peer a binary is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Firecracker,
    CloudHypervisor,
}

/// A peer VMM binary named on the command line.
#[derive(Clone, Debug)]
pub struct Peer {
    pub kind: Kind,
    pub path: PathBuf,
}

/// The peers named by `--firecracker PATH` and `--cloud-hypervisor PATH`; a named path that
/// is not an executable file stops the bench (a typo must not read as "not measured").
pub fn from_args(args: &[String]) -> Vec<Peer> {
    let mut out = Vec::new();
    for (flag, kind) in [
        ("--firecracker", Kind::Firecracker),
        ("--cloud-hypervisor", Kind::CloudHypervisor),
    ] {
        if let Some(i) = args.iter().position(|a| a == flag) {
            let path = PathBuf::from(args.get(i + 1).unwrap_or_else(|| panic!("{flag} PATH")));
            assert!(
                path.is_file(),
                "{flag} {}: no such file (build the peer outside this repository and give its binary)",
                path.display()
            );
            out.push(Peer { kind, path });
        }
    }
    out
}

impl Peer {
    /// The subject's name in the tables.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Firecracker => "firecracker",
            Kind::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// A command line that boots the probe guest (1 vCPU, `memory_mib`, its serial port on
    /// stdout) with no API and exits when the probe ends. `dir` holds Firecracker's config
    /// file. The probe's last command is one the peer ends on: Firecracker stops on an i8042
    /// reset (`reboot`) and has no ACPI sleep register; Cloud Hypervisor's FADT has the
    /// hardware-reduced sleep control register (`poweroff`).
    pub fn boot_cmd(&self, probe: &Path, dir: &Path, memory_mib: u32) -> Vec<String> {
        let path = self.path.to_str().expect("peer path").to_string();
        match self.kind {
            Kind::Firecracker => {
                let cfg = dir.join("firecracker-boot.json");
                let json = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": probe,
                        "boot_args": "console=ttyS0 probe=reboot",
                    },
                    "drives": [],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib},
                });
                std::fs::write(&cfg, json.to_string()).expect("firecracker config");
                vec![
                    path,
                    "--no-api".into(),
                    "--config-file".into(),
                    cfg.to_str().unwrap().into(),
                    "--level".into(),
                    "Error".into(),
                ]
            }
            Kind::CloudHypervisor => {
                let mut v = vec![path];
                v.extend(strings(&[
                    "--kernel",
                    probe.to_str().unwrap(),
                    "--cmdline",
                    "console=ttyS0 probe=poweroff",
                    "--cpus",
                    "boot=1",
                    "--memory",
                    &format!("size={memory_mib}M"),
                    "--serial",
                    "tty",
                    "--console",
                    "off",
                ]));
                v
            }
        }
    }

    /// The peer with only its API, listening on `socket` (no VM).
    pub fn spawn_api(&self, socket: &Path) -> Child {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(&self.path);
        match self.kind {
            Kind::Firecracker => cmd.arg("--api-sock").arg(socket).args(["--level", "Error"]),
            Kind::CloudHypervisor => cmd
                .arg("--api-socket")
                .arg(format!("path={}", socket.display())),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.path.display()))
    }

    /// A GET its API answers with 200 when no VM is configured.
    pub fn ping_path(&self) -> &'static str {
        match self.kind {
            Kind::Firecracker => "/",
            Kind::CloudHypervisor => "/api/v1/vmm.ping",
        }
    }
}

/// A kept-alive HTTP/1.1 connection over a Unix socket, the same for every VMM: one request
/// at a time, `Content-Length` bodies only (what the three APIs answer GETs with).
pub struct RawHttp {
    reader: BufReader<UnixStream>,
}

impl RawHttp {
    pub fn connect(socket: &Path) -> std::io::Result<RawHttp> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(RawHttp {
            reader: BufReader::new(s),
        })
    }

    /// `GET path`: the status, or an error when the connection failed or closed.
    pub fn get(&mut self, path: &str) -> std::io::Result<u16> {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        Ok(status)
    }
}

/// Spawns a VMM's API (`spawn`) and times process start → the first 200 to `GET path`, polling
/// every 100 µs (connect, then one request per connection until one answers).
pub fn time_to_api(spawn: impl FnOnce() -> Child, socket: &Path, path: &str) -> (Duration, Child) {
    let start = Instant::now();
    let mut child = spawn();
    let end = start + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = RawHttp::connect(socket) {
            if c.get(path).is_ok_and(|s| s == 200) {
                return (start.elapsed(), child);
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{path}: the VMM exited before answering: {st}");
        }
        assert!(
            Instant::now() < end,
            "no API answer on {} within 10 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}
