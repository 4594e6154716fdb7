//! Why a control-plane call was refused. Each variant is one kind of refusal a client can act
//! on; the API gives each its own error code.

use std::fmt;

use crate::lifecycle::InstanceState;
use crate::model::Revision;

/// The kinds of things the control plane keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An instance.
    Instance,
    /// A disk.
    Disk,
    /// An image.
    Image,
    /// An operation.
    Operation,
    /// A snapshot (of an instance or of a disk).
    Snapshot,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Instance => "instance",
            Kind::Disk => "disk",
            Kind::Image => "image",
            Kind::Operation => "operation",
            Kind::Snapshot => "snapshot",
        })
    }
}

/// Why a call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No such resource.
    #[error("{kind} {key} not found")]
    NotFound {
        /// What was looked for.
        kind: Kind,
        /// The name or id asked for.
        key: String,
    },
    /// The action does not fit the instance's state.
    #[error("instance {name} is {state}; {hint}")]
    InvalidState {
        /// Instance name.
        name: String,
        /// Its state.
        state: InstanceState,
        /// What to do.
        hint: &'static str,
    },
    /// The name is taken.
    #[error("{kind} {name:?} already exists; pick another name")]
    AlreadyExists {
        /// What kind of resource.
        kind: Kind,
        /// The name.
        name: String,
    },
    /// The resource is used by another one.
    #[error("{0}")]
    InUse(String),
    /// A field has a bad value.
    #[error("{field}: {message}")]
    InvalidValue {
        /// The field, dotted as in the request (`boot.kernel`, `disks[0].create.size`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// More than the host can give.
    #[error("{0}")]
    InsufficientCapacity(String),
    /// The definition changed since the revision the caller named.
    #[error("the {kind} changed since it was read (it is at generation {})", current.generation)]
    Changed {
        /// What kind of resource.
        kind: Kind,
        /// Its revision now.
        current: Revision,
    },
    /// Something failed on the host.
    #[error("{0}")]
    Internal(String),
}

/// A shorter `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The same error with `prefix` before its field name (`disks[0].create.`).
    pub(crate) fn in_field(self, prefix: &str) -> Self {
        match self {
            Error::InvalidValue { field, message } if !prefix.is_empty() => Error::InvalidValue {
                field: format!("{prefix}{field}"),
                message,
            },
            e => e,
        }
    }

    pub(crate) fn not_found(kind: Kind, key: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            key: key.into(),
        }
    }

    pub(crate) fn internal(context: &str, e: impl fmt::Display) -> Self {
        Error::Internal(format!("{context}: {e}"))
    }
}

/// A field with a bad value.
pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::InvalidValue {
        field: field.into(),
        message: message.into(),
    }
}
