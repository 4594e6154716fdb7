//! The host's event log: state changes and operation updates, numbered, the newest kept.
//! Readers waiting for new events are woken by a watch channel of the last number.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use devices::bus::lock;
use tokio::sync::watch;
use uuid::Uuid;

const KEEP: usize = 4096;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// An instance's state changed (`state` is the new one, or `deleted`).
    InstanceState(Uuid),
    /// An instance's definition changed (`state` is its state).
    InstanceUpdated(Uuid),
    /// A disk was created or deleted.
    Disk(Uuid),
    /// An image was registered or deleted.
    Image(Uuid),
    /// An operation ended (`succeeded` or `failed`).
    Operation(Uuid),
}

impl Subject {
    /// The event's kind: `instance.state`, `instance.updated`, `disk`, `image`, `operation`.
    pub const fn kind(self) -> &'static str {
        match self {
            Subject::InstanceState(_) => "instance.state",
            Subject::InstanceUpdated(_) => "instance.updated",
            Subject::Disk(_) => "disk",
            Subject::Image(_) => "image",
            Subject::Operation(_) => "operation",
        }
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Increasing sequence number, from 1.
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    /// What it is about.
    pub subject: Subject,
    /// The new state (`running`, `created`, `deleted`, `succeeded`, …).
    pub state: String,
    /// Why, when there is a reason.
    pub reason: Option<String>,
    /// The name of what it is about when the event was recorded (for an operation, its
    /// instance's), when known.
    pub name: Option<String>,
}

/// Events, with waiting for new ones.
pub struct EventLog {
    log: Mutex<VecDeque<Event>>,
    last: watch::Sender<u64>,
    /// The names of what events are about, by id (kept after a deletion, for its event).
    names: Mutex<HashMap<Uuid, String>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            log: Mutex::default(),
            last: watch::channel(0).0,
            names: Mutex::default(),
        }
    }
}

impl Subject {
    /// The id of what the event is about.
    pub const fn id(self) -> Uuid {
        match self {
            Subject::InstanceState(id)
            | Subject::InstanceUpdated(id)
            | Subject::Disk(id)
            | Subject::Image(id)
            | Subject::Operation(id) => id,
        }
    }
}

impl EventLog {
    /// Names the resource (or operation) `id` in the events about it from now on.
    pub fn name(&self, id: Uuid, name: &str) {
        lock(&self.names).insert(id, name.to_string());
    }

    /// Records an event.
    pub fn push(&self, subject: Subject, state: &str, reason: Option<String>) {
        let name = lock(&self.names).get(&subject.id()).cloned();
        // The number is published under the log's lock, so that it never goes back.
        let mut l = lock(&self.log);
        let seq = l.back().map_or(0, |e| e.seq) + 1;
        let e = Event {
            seq,
            time: crate::model::now(),
            subject,
            state: state.into(),
            reason,
            name,
        };
        tracing::info!(
            id = %subject.id(),
            name = e.name.as_deref().unwrap_or("-"),
            state = %e.state,
            reason = e.reason.as_deref().unwrap_or(""),
            "{}",
            subject.kind()
        );
        l.push_back(e);
        if l.len() > KEEP {
            l.pop_front();
        }
        self.last.send_replace(seq);
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        *self.last.borrow()
    }

    /// The events kept after `seq`.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        lock(&self.log)
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// Events after `seq`, waiting up to `timeout` for one if there are none yet.
    pub async fn wait_since(&self, seq: u64, timeout: Duration) -> Vec<Event> {
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|last| *last > seq)).await;
        self.since(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn numbered_and_waited_for() {
        let log = std::sync::Arc::new(EventLog::default());
        assert!(log.wait_since(0, Duration::from_millis(1)).await.is_empty());
        let l2 = log.clone();
        let waiter = tokio::spawn(async move { l2.wait_since(0, Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        log.push(Subject::Disk(Uuid::nil()), "created", None);
        log.push(Subject::Disk(Uuid::nil()), "deleted", None);
        let got = waiter.await.unwrap();
        assert_eq!(got[0].seq, 1);
        assert_eq!(got[0].subject.kind(), "disk");
        assert_eq!(log.last_seq(), 2);
        assert_eq!(log.since(1).len(), 1);
    }
}
