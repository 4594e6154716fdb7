//! A network namespace with a TAP device in it, for tests whose guests talk to the host:
//! their traffic stays inside it.

use std::os::fd::AsRawFd;
use std::process::Command;

/// A network namespace holding one TAP device with a host address, removed on drop.
pub struct Netns(pub String);

impl Netns {
    /// Creates `kiln-<tag>-<pid>` with TAP `tap` up and `host_ip`/24 on it.
    pub fn new(tag: &str, tap: &str, host_ip: &str) -> Self {
        let name = format!("kiln-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = Command::new("ip")
                .args(args)
                .status()
                .expect("ip (iproute2)");
            assert!(st.success(), "ip {args:?} failed");
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", &ns.0, "link", "set", tap, "up"]);
        ns
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with an fd we own.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
