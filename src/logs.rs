//! `kiln logs NAME` (an instance's console history, `--follow` for new output) and
//! `kiln events` (the server's events, `--follow` for new ones).

use clap::Args;

use crate::endpoint::{out, out_bytes, Endpoint, Failed};

/// How long one read of a followed console waits on the server for new output.
const FOLLOW_WAIT_S: u64 = 30;

/// `kiln logs`
#[derive(Args)]
pub struct LogsArgs {
    /// Instance name or id.
    name: String,
    /// Keep printing new output until the instance is deleted (or Ctrl-C).
    #[arg(short, long)]
    follow: bool,
    /// Only the last BYTES bytes of the history (256K, 1M, or a bare number of bytes).
    #[arg(long, value_name = "BYTES")]
    tail: Option<String>,
}

/// Runs `kiln logs`; returns the exit status.
pub fn logs(ep: Endpoint, args: LogsArgs) -> i32 {
    ep.run(|_, c| async move {
        let tail = match &args.tail {
            Some(t) => Some(vmm::parse_size(t, 1).map_err(|e| format!("--tail: {e}"))?),
            None => None,
        };
        let first = c
            .instance_console(&args.name, tail.is_none().then_some(0), tail)
            .await?;
        out_bytes(&first.bytes);
        let mut at = first.end;
        if !args.follow {
            return Ok(());
        }
        loop {
            let chunk = match c.instance_console_wait(&args.name, at, FOLLOW_WAIT_S).await {
                Ok(chunk) => chunk,
                // Deleted while followed: its console is over.
                Err(e) if e.code() == Some(api::ErrorCode::NotFound) => break,
                Err(e) => return Err(e.into()),
            };
            out_bytes(&chunk.bytes);
            at = chunk.end;
        }
        Ok::<(), Failed>(())
    })
}

/// `kiln events`
#[derive(Args)]
pub struct EventsArgs {
    /// Only events after this sequence number (default: every event kept; with --follow,
    /// those from now on).
    #[arg(long, value_name = "SEQ")]
    since: Option<u64>,
    /// Keep printing new events (until Ctrl-C).
    #[arg(short, long)]
    follow: bool,
}

/// Runs `kiln events`; returns the exit status. Each event is one line: its number, time,
/// kind, the resource's name, its new state and why (with `--json`, its JSON on one line).
pub fn events(ep: Endpoint, args: EventsArgs) -> i32 {
    ep.run(|ep, c| async move {
        let mut stream = if args.follow {
            c.event_stream(args.since).await?
        } else {
            c.event_history(args.since.unwrap_or(0)).await?
        };
        let status = stream.status;
        if !status.is_success() {
            return Err(Failed::Usage(format!("the server answered {status}")));
        }
        let mut pending = String::new();
        while let Some(chunk) = stream.chunk().await {
            pending.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(at) = pending.find('\n') {
                let line: String = pending.drain(..=at).collect();
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    print_event(&ep, data.trim());
                }
            }
        }
        Ok(())
    })
}

/// One event line.
fn print_event(ep: &Endpoint, data: &str) {
    let Ok(e) = serde_json::from_str::<client::wire::Event>(data) else {
        return;
    };
    if ep.json {
        out(&format!(
            "{}\n",
            serde_json::to_string(&e).unwrap_or_default()
        ));
        return;
    }
    let who = e.name.clone().unwrap_or_else(|| e.resource.clone());
    let why = e
        .reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    out(&format!(
        "{:>5} {} {:<16} {:<12} {}{why}\n",
        e.seq, e.time, e.kind, who, e.state
    ));
}
