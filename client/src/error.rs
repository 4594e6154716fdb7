//! What a call can fail with.

use api::error::ErrorDetail;
use hyper::StatusCode;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The socket or address.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed during the exchange.
    #[error("{0}")]
    Transport(String),
    /// The server refused the request with the API's error shape.
    #[error("{} ({})", .error.message, .error.code)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error.
        error: ErrorDetail,
    },
    /// The server answered an unexpected status without the API's error shape.
    #[error("the server answered {status}{}", if .text.is_empty() { String::new() } else { format!(": {}", .text) })]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body, as text.
        text: String,
    },
    /// The answer is not what the API documents.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

impl Error {
    /// The API's error code (`not_found`, `invalid_state`, …), when the server sent one.
    pub fn code(&self) -> Option<api::ErrorCode> {
        match self {
            Error::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// The HTTP status of a refusal, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } | Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error of an answer with `status` and `body` that is not a success.
    pub(crate) fn from_answer(status: StatusCode, body: &[u8]) -> Self {
        match serde_json::from_slice::<api::error::ErrorBody>(body) {
            Ok(b) => Error::Api {
                status,
                error: b.error,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body).trim().to_string();
                let text = if text.len() < 200 {
                    text
                } else {
                    String::new()
                };
                Error::Status { status, text }
            }
        }
    }
}
