//! The host's event log: state changes and operation updates, numbered, newest kept.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use devices::bus::lock;
use serde::Serialize;

const KEEP: usize = 4096;

/// One event.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Increasing sequence number.
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    /// `instance.state` or `operation`.
    pub kind: String,
    /// API path of the resource.
    pub resource: String,
    /// The new state.
    pub state: String,
    /// Why, when there is a reason.
    pub reason: Option<String>,
}

/// Events, with waiting for new ones.
#[derive(Default)]
pub struct EventLog {
    log: Mutex<(VecDeque<Event>, u64)>,
    added: Condvar,
}

impl EventLog {
    /// Records an event.
    pub fn push(&self, kind: &str, resource: String, state: String, reason: Option<String>) {
        let mut l = lock(&self.log);
        l.1 += 1;
        let e = Event {
            seq: l.1,
            time: super::model::now(),
            kind: kind.into(),
            resource,
            state,
            reason,
        };
        tracing::info!(resource = %e.resource, state = %e.state, "{}", e.kind);
        l.0.push_back(e);
        if l.0.len() > KEEP {
            l.0.pop_front();
        }
        self.added.notify_all();
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        lock(&self.log).1
    }

    /// Events after `seq`, waiting up to `timeout` for one if there are none yet.
    pub fn since(&self, seq: u64, timeout: Duration) -> Vec<Event> {
        let l = lock(&self.log);
        let (l, _) = self
            .added
            .wait_timeout_while(l, timeout, |l| l.1 <= seq)
            .unwrap_or_else(|e| e.into_inner());
        l.0.iter().filter(|e| e.seq > seq).cloned().collect()
    }
}
