//! Long-running actions as operations a client can poll or wait on.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use devices::bus::lock;
use serde::Serialize;
use uuid::Uuid;

const KEEP: usize = 1024;

/// Operation states (API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Not started yet.
    Pending,
    /// Under way.
    Running,
    /// Done.
    Succeeded,
    /// Ended with `error`.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// One operation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Operation {
    /// UUID.
    pub id: Uuid,
    /// `instance.start`, …
    pub kind: String,
    /// API path of the resource.
    pub resource: String,
    /// State.
    pub state: OperationState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// What went wrong.
    pub error: Option<String>,
}

/// Recent operations.
#[derive(Default)]
pub struct Operations {
    ops: Mutex<VecDeque<Operation>>,
    changed: Condvar,
}

impl Operations {
    /// A new running operation.
    pub fn begin(&self, kind: &str, resource: String) -> Operation {
        let now = super::model::now();
        let op = Operation {
            id: Uuid::new_v4(),
            kind: kind.into(),
            resource,
            state: OperationState::Running,
            created_at: now.clone(),
            updated_at: now,
            error: None,
        };
        let mut ops = lock(&self.ops);
        ops.push_back(op.clone());
        if ops.len() > KEEP {
            ops.pop_front();
        }
        op
    }

    /// Ends `id` with `result`.
    pub fn end(&self, id: Uuid, result: Result<(), String>) {
        let mut ops = lock(&self.ops);
        if let Some(op) = ops.iter_mut().find(|o| o.id == id) {
            op.updated_at = super::model::now();
            match result {
                Ok(()) => op.state = OperationState::Succeeded,
                Err(e) => {
                    op.state = OperationState::Failed;
                    op.error = Some(e);
                }
            }
        }
        self.changed.notify_all();
    }

    /// One operation.
    pub fn get(&self, id: Uuid) -> Option<Operation> {
        lock(&self.ops).iter().find(|o| o.id == id).cloned()
    }

    /// All kept operations, oldest first.
    pub fn list(&self) -> Vec<Operation> {
        lock(&self.ops).iter().cloned().collect()
    }

    /// Waits until `id` is no longer pending or running, at most `timeout`.
    pub fn wait(&self, id: Uuid, timeout: Duration) -> Option<Operation> {
        let ops = lock(&self.ops);
        let busy = |ops: &mut VecDeque<Operation>| {
            ops.iter().any(|o| {
                o.id == id && matches!(o.state, OperationState::Pending | OperationState::Running)
            })
        };
        let (ops, _) = self
            .changed
            .wait_timeout_while(ops, timeout, busy)
            .unwrap_or_else(|e| e.into_inner());
        ops.iter().find(|o| o.id == id).cloned()
    }
}
