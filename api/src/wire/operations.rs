//! Operations and events on the wire.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::values::OperationState;
use crate::resource::{instance_path, subject_path};

/// A long-running action a client can poll or wait on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Operation {
    /// UUID.
    pub id: Uuid,
    /// What it does: `instance.start`, `instance.stop`, …
    pub kind: String,
    /// The path of the resource it acts on (`/v1/instances/{id}`).
    pub resource: String,
    /// State.
    pub state: OperationState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// What went wrong, once it failed.
    pub error: Option<String>,
    /// What a user should know of an operation that succeeded: a stop that had to be forced
    /// after its timeout says so here.
    #[serde(default)]
    pub detail: Option<String>,
}

impl From<control::Operation> for Operation {
    fn from(o: control::Operation) -> Self {
        Self {
            id: o.id,
            kind: format!("instance.{}", o.action),
            resource: instance_path(o.instance),
            state: o.state.into(),
            created_at: o.created_at,
            updated_at: o.updated_at,
            error: o.error,
            detail: o.detail,
        }
    }
}

/// A state change or an operation update, as `GET /v1/events` streams them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Event {
    /// Increasing sequence number (the SSE `id:`).
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    /// `instance.state`, `instance.updated`, `disk`, `image` or `operation` (the SSE `event:`).
    pub kind: String,
    /// The path of the resource it is about.
    pub resource: String,
    /// The resource's name when the event was recorded (for an operation, its instance's).
    #[serde(default)]
    pub name: Option<String>,
    /// The new state (`running`, `deleted`, `created`, `succeeded`, …).
    pub state: String,
    /// Why, when there is a reason.
    pub reason: Option<String>,
}

impl From<control::Event> for Event {
    fn from(e: control::Event) -> Self {
        Self {
            seq: e.seq,
            time: e.time,
            kind: e.subject.kind().to_string(),
            resource: subject_path(e.subject),
            name: e.name,
            state: e.state,
            reason: e.reason,
        }
    }
}
