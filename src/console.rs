//! `kiln console NAME`: the serial console of a running instance, over the API's websocket.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use clap::Args;
use client::wire::InstanceState;
use client::Message;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::endpoint::{Endpoint, Failed};

/// The detach key: Ctrl-] (GS), as telnet and virsh.
const DETACH: u8 = 0x1d;

/// How often the client checks that the instance still runs.
const STATE_POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
pub struct ConsoleArgs {
    /// Instance name or id.
    name: String,
    /// When stdin is not a terminal: after stdin ends, leave once the guest has printed
    /// nothing for SECS seconds (0: stay until the instance stops or the server closes the
    /// connection).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    timeout: f64,
}

/// Why the console ended.
enum End {
    Detached,
    StdinDone,
    Stopped(String),
    ServerClosed,
    OutputClosed,
    Signal(i32),
}

/// The terminal in raw mode; the saved settings come back on drop (every exit path, panics
/// included: the release profile unwinds).
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enable(fd: i32) -> std::io::Result<RawMode> {
        // SAFETY: tcgetattr/tcsetattr on our stdin with termios structs we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings tcgetattr gave us.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Runs `kiln console`; returns the exit status.
pub fn console(ep: Endpoint, args: ConsoleArgs) -> i32 {
    let rt = match crate::endpoint::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    let code = match rt.block_on(run(&ep, &args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {}", ep.explain(e));
            1
        }
    };
    // The stdin reader thread may be blocked in read(2): do not wait for it.
    rt.shutdown_background();
    code
}

/// States in which the guest has a serial port to talk to.
fn live(state: InstanceState) -> bool {
    control_state(state).has_vm()
}

/// The control plane's state of a wire state (its rules say which have a VM).
fn control_state(state: InstanceState) -> control::InstanceState {
    state.into()
}

async fn state_of(c: &client::Client, name: &str) -> Result<InstanceState, client::Error> {
    Ok(c.instance_get(name).await?.value.state)
}

async fn run(ep: &Endpoint, args: &ConsoleArgs) -> Result<i32, Failed> {
    let name = &args.name;
    let c = ep.client()?;
    let state = state_of(&c, name).await?;
    if !live(state) {
        let state = control_state(state);
        return Err(Failed::Usage(format!(
            "instance {name} is {state}; start it first"
        )));
    }
    let ws = c.instance_console_stream(name).await?;
    let (mut ws_tx, mut ws_rx) = ws.split();

    let interactive = std::io::stdin().is_terminal();
    eprintln!("Connected to {name}; detach with Ctrl-]");
    let raw = if interactive {
        Some(RawMode::enable(0).map_err(|e| format!("cannot put the terminal in raw mode: {e}"))?)
    } else {
        None
    };

    // stdin in a thread of its own: a blocked read(2) must not hold up the exit.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });

    // The instance's state, checked in the background: the websocket stays open when the
    // guest stops, so the client watches for that itself.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<String>();
    let (c2, name2) = (c.clone(), name.clone());
    let watcher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(STATE_POLL).await;
            match state_of(&c2, &name2).await {
                Ok(s) if live(s) => {}
                Ok(s) => {
                    let _ = stop_tx.send(control_state(s).to_string());
                    return;
                }
                Err(e) if e.code() == Some(api::ErrorCode::NotFound) => {
                    let _ = stop_tx.send("deleted".into());
                    return;
                }
                Err(_) => {}
            }
        }
    });

    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = signal(tokio::signal::unix::SignalKind::hangup())?;

    let idle = Duration::from_secs_f64(args.timeout.max(0.0));
    let mut stdin_open = true;
    let mut deadline: Option<Instant> = None;
    let mut stdout = std::io::stdout();
    let end: Result<End, String> = loop {
        tokio::select! {
            msg = ws_rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if write_out(&mut stdout, &b).is_err() {
                        break Ok(End::OutputClosed);
                    }
                    if deadline.is_some() {
                        deadline = Some(Instant::now() + idle);
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if write_out(&mut stdout, t.as_bytes()).is_err() {
                        break Ok(End::OutputClosed);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break Ok(End::ServerClosed),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(format!("console connection: {e}")),
            },
            input = in_rx.recv(), if stdin_open => match input {
                Some(bytes) => {
                    let (send, detach) = match bytes.iter().position(|&b| b == DETACH) {
                        Some(i) => (&bytes[..i], true),
                        None => (&bytes[..], false),
                    };
                    if !send.is_empty() {
                        if let Err(e) = ws_tx.send(Message::binary(send.to_vec())).await {
                            break Err(format!("console connection: {e}"));
                        }
                    }
                    if detach {
                        break Ok(End::Detached);
                    }
                }
                None => {
                    stdin_open = false;
                    if interactive {
                        break Ok(End::StdinDone);
                    }
                    if !idle.is_zero() {
                        deadline = Some(Instant::now() + idle);
                    }
                }
            },
            _ = sleep_until(deadline) => break Ok(End::StdinDone),
            state = &mut stop_rx => match state {
                Ok(s) => {
                    // Let the last output of the guest arrive.
                    let grace = Instant::now() + Duration::from_millis(300);
                    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(grace, ws_rx.next()).await {
                        if let Message::Binary(b) = m {
                            let _ = write_out(&mut stdout, &b);
                        }
                    }
                    break Ok(End::Stopped(s));
                }
                Err(_) => break Err("lost track of the instance's state".into()),
            },
            _ = sigint.recv() => break Ok(End::Signal(libc::SIGINT)),
            _ = sigterm.recv() => break Ok(End::Signal(libc::SIGTERM)),
            _ = sighup.recv() => break Ok(End::Signal(libc::SIGHUP)),
        }
    };
    watcher.abort();
    let _ = ws_tx.send(Message::Close(None)).await;
    drop(raw);
    let end = end?;
    if interactive {
        // The cursor may be anywhere on the guest's last line.
        eprintln!();
    }
    Ok(match end {
        End::Detached => {
            eprintln!("Detached from {name}.");
            0
        }
        End::StdinDone | End::OutputClosed => 0,
        End::Stopped(s) => {
            eprintln!("Instance {name} is {s}.");
            0
        }
        End::ServerClosed => {
            eprintln!("The server closed the console of {name}.");
            0
        }
        End::Signal(sig) => 128 + sig,
    })
}

fn write_out(out: &mut std::io::Stdout, b: &[u8]) -> std::io::Result<()> {
    let mut out = out.lock();
    out.write_all(b)?;
    out.flush()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, Failed> {
    tokio::signal::unix::signal(kind).map_err(|e| Failed::Usage(format!("signal handler: {e}")))
}
