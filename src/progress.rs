//! Waiting for operations (start, stop, …) with a spinner on stderr that says what is being
//! waited for and for how long; hidden when stderr is not a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use client::wire::{Operation, OperationState};
use indicatif::{ProgressBar, ProgressStyle};

/// How long one wait call asks the server to hold (the spinner's message is refreshed between).
const POLL_S: u64 = 1;

/// A spinner with `msg`, ticking; hidden when stderr is not a terminal.
pub fn spinner(msg: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Waits until every operation of `ops` (by the instance it acts on) has ended, showing
/// `what` on the spinner; answers them ended, in the same order.
pub async fn wait_all(
    c: &client::Client,
    ops: Vec<(String, Operation)>,
    what: &str,
) -> Result<Vec<(String, Operation)>, client::Error> {
    if ops.is_empty() {
        return Ok(ops);
    }
    let names: Vec<&str> = ops.iter().map(|(n, _)| n.as_str()).collect();
    let pb = spinner(format!("{}: {what}", names.join(", ")));
    let mut done = Vec::with_capacity(ops.len());
    for (name, mut op) in ops {
        while !is_done(op.state) {
            op = c.operation_wait(op.id, POLL_S).await?;
        }
        done.push((name, op));
    }
    pb.finish_and_clear();
    Ok(done)
}

/// True once an operation has ended.
pub fn is_done(s: OperationState) -> bool {
    !matches!(s, OperationState::Pending | OperationState::Running)
}
