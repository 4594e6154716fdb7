//! virtio-net on a real TAP in a network namespace the test creates: the probe guest answers
//! the host's pings and UDP datagrams, and sends datagrams the host checks. Traffic stays
//! inside that namespace.

mod common;

use common::netns::Netns;
use common::*;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const TAP: &str = "ktap0";

fn payload(k: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|i| (k.wrapping_mul(13) as usize + i) as u8)
        .collect();
    p[..4].copy_from_slice(&k.to_le_bytes());
    p
}

#[test]
fn ping_and_udp_both_ways_over_a_tap() {
    require_kvm();
    let ns = Netns::new("net", TAP, HOST_IP);
    const PINGS: u32 = 20;
    const ECHOES: u32 = 1000;
    const SENDS: u32 = 1000;
    // The host's receiver for the guest's datagrams, bound before the guest sends.
    let (sock_tx, sock_rx) = mpsc::channel();
    let receiver = {
        let path = format!("/var/run/netns/{}", ns.0);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let s = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            sock_tx.send(()).unwrap();
            let mut got = vec![false; SENDS as usize];
            let mut buf = [0u8; 2048];
            while got.iter().any(|g| !g) {
                let Ok((n, _)) = s.recv_from(&mut buf) else {
                    break;
                };
                let k = u32::from_le_bytes(buf[..4].try_into().unwrap());
                if (k as usize) < got.len() && buf[..n] == payload(k, 200)[..] {
                    got[k as usize] = true;
                }
            }
            got.iter().filter(|g| **g).count()
        })
    };
    sock_rx.recv().unwrap();

    let cmds = format!(
        "net-info:0,net-ip:0:{GUEST_IP},net-serve:0:{},net-send:0:{HOST_IP}:9000:{SENDS}:200,poweroff",
        PINGS + ECHOES
    );
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_kiln"),
            "run",
            "--net",
        ])
        .arg(format!("tap={TAP},mac=02:00:00:00:00:02"))
        .args(["--cmdline", &format!("console=ttyS0 probe={cmds}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, lines) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = line_tx.send(l.trim_end_matches('\r').to_string());
        }
    });
    let mut log = Vec::new();
    let mut wait_for = |prefix: &str, limit: Duration| -> bool {
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.starts_with(prefix);
                    log.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    };
    assert!(
        wait_for("PROBE-OK net-ip net0", Duration::from_secs(30)),
        "{log:?}"
    );

    // Host → guest: pings, then UDP echoes with checked payloads.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "ping",
            "-q",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.01",
            "-W",
            "5",
            GUEST_IP,
        ])
        .output()
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(ping.status.success(), "ping: {ping_out}");
    assert!(
        ping_out.contains(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "{ping_out}"
    );
    let echoed = ns.run(move || {
        let s = UdpSocket::bind((HOST_IP, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ok = 0;
        let mut buf = [0u8; 2048];
        for k in 0..ECHOES {
            let p = payload(k, 100 + (k as usize % 1300));
            s.send_to(&p, (GUEST_IP, 7)).unwrap();
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if buf[..n] == p[..] {
                    ok += 1;
                }
            }
        }
        ok
    });
    assert_eq!(echoed, ECHOES);
    assert!(
        wait_for("PROBE-OK net-serve net0", Duration::from_secs(30)),
        "{log:?}"
    );
    assert!(
        wait_for("PROBE-OK net-send net0", Duration::from_secs(60)),
        "{log:?}"
    );
    let received = receiver.join().unwrap();
    assert_eq!(
        received, SENDS as usize,
        "guest → host datagrams with checked payloads"
    );
    assert!(
        wait_for("PROBE-OK poweroff", Duration::from_secs(30)),
        "{log:?}"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{log:?}");
    assert!(
        log.iter()
            .any(|l| l == "PROBE-OK net-info net0 mac=02:00:00:00:00:02"),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with(&format!(
            "PROBE-OK net-serve net0 answered={}",
            PINGS + ECHOES
        ))),
        "{log:?}"
    );
}

#[test]
fn a_guest_with_a_nic_reboots_in_place() {
    // A TAP takes one owner: the second boot opens it again only if the first let it go.
    require_kvm();
    let ns = Netns::new("netreboot", TAP, HOST_IP);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_kiln")]);
    let net = format!("tap={TAP}");
    let r = run_until_then(
        cmd,
        &[
            "run",
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 probe=0:reboot,1:reboot-acpi,net-info:0,poweroff",
        ],
        &["PROBE-OK poweroff"],
        Duration::from_secs(30),
        || {},
    );
    assert_eq!(r.count("KILN-PROBE v1"), 3, "{}", r.dump());
    assert_eq!(r.count("PROBE-OK net-info net0"), 1, "{}", r.dump());
}
