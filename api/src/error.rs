//! The one error shape of the API: `{"error": {"code", "message", "request_id"}}`.
//!
//! Every failure a client can see is an [`ApiError`]: a machine-readable [`ErrorCode`] (which
//! fixes the HTTP status) and a human-readable message. The request id is filled in when the
//! error is turned into a response, from the request being served (see [`crate::request_id`]).

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::request_id::RequestId;

/// The machine-readable code of an error; each code has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (bad JSON, bad header, bad query).
    BadRequest,
    /// 400: a field has a value the server does not accept; the message names the field.
    InvalidValue,
    /// 400: the `api-version` request header is newer than this server's API version.
    UnsupportedApiVersion,
    /// 401: missing or wrong bearer token (TCP listener).
    Unauthorized,
    /// 404: no such path or resource.
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: the resource is in a state that does not allow this.
    InvalidState,
    /// 409: a resource with this name already exists.
    AlreadyExists,
    /// 409: the resource is used by another one.
    InUse,
    /// 412: `If-Match` does not match the current ETag.
    PreconditionFailed,
    /// 413: the request body is larger than the limit.
    TooLarge,
    /// 413: more vCPUs or memory than the host can give.
    InsufficientCapacity,
    /// 415: the request body has the wrong `Content-Type`.
    UnsupportedMediaType,
    /// 500: a fault of the server; details are in the server log under the request id.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest | Self::InvalidValue | Self::UnsupportedApiVersion => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidState | Self::AlreadyExists | Self::InUse => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::TooLarge | Self::InsufficientCapacity => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code as it appears on the wire (`"invalid_state"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidValue => "invalid_value",
            Self::UnsupportedApiVersion => "unsupported_api_version",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidState => "invalid_state",
            Self::AlreadyExists => "already_exists",
            Self::InUse => "in_use",
            Self::PreconditionFailed => "precondition_failed",
            Self::TooLarge => "too_large",
            Self::InsufficientCapacity => "insufficient_capacity",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Internal => "internal",
        }
    }

    /// The code a bare HTTP error status maps to (used to reshape errors that did not come
    /// from an [`ApiError`], such as a framework rejection).
    pub fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            401 => Self::Unauthorized,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::InvalidState,
            412 => Self::PreconditionFailed,
            413 => Self::TooLarge,
            415 => Self::UnsupportedMediaType,
            422 => Self::InvalidValue,
            400..=499 => Self::BadRequest,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the API reports it. Build one with the constructor named after its code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// For `internal` only: what went wrong, for the log, never for the client.
    detail: Option<String>,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` member of [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code; fixes the HTTP status.
    pub code: ErrorCode,
    /// What was wrong, for a person; names the field when a field was wrong.
    pub message: String,
    /// The id of the request (also in the `x-request-id` response header).
    pub request_id: String,
}

impl ApiError {
    /// An error with any code and message. Prefer the named constructors.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 400 `invalid_value`: the message is prefixed with the field's name.
    pub fn invalid_value(field: &str, message: impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::InvalidValue,
            format!("invalid value for `{field}`: {message}"),
        )
    }

    /// 400 `unsupported_api_version`, naming both versions.
    pub fn unsupported_api_version(requested: &str, supported: &str) -> Self {
        Self::new(
            ErrorCode::UnsupportedApiVersion,
            format!(
                "api-version {requested} is newer than this server supports (api version {supported})"
            ),
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MethodNotAllowed, message)
    }

    /// 409 `invalid_state`.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidState, message)
    }

    /// 409 `already_exists`.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AlreadyExists, message)
    }

    /// 409 `in_use`.
    pub fn in_use(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InUse, message)
    }

    /// 412 `precondition_failed`.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PreconditionFailed, message)
    }

    /// 413 `too_large` (request body over the limit).
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// 413 `insufficient_capacity` (more than the host can give).
    pub fn insufficient_capacity(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InsufficientCapacity, message)
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedMediaType, message)
    }

    /// 500 `internal`. `detail` is logged with the request id when the error is sent; the
    /// client only gets a generic message that points at the log.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self {
            code: ErrorCode::Internal,
            message: "internal server error; the server log has the details under this request id"
                .to_string(),
            detail: Some(detail.to_string()),
        }
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The body this error is sent with, for the given request id.
    pub fn to_body(&self, request_id: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
                request_id: request_id.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = RequestId::current_or_new();
        if let Some(detail) = &self.detail {
            tracing::error!(request_id = %request_id, detail = %detail, "internal error");
        }
        let body = serde_json::to_vec(&self.to_body(request_id.as_str()))
            .unwrap_or_else(|_| b"{\"error\":{\"code\":\"internal\"}}".to_vec());
        let mut response = (
            self.status(),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if self.code == ErrorCode::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorRendered);
        response
    }
}

/// Marks a response whose body is already the JSON error shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorRendered;

/// Each refusal of the control plane maps onto one API error code (API.md).
impl From<control::Error> for ApiError {
    fn from(e: control::Error) -> Self {
        use control::Error as E;
        let msg = e.to_string();
        match e {
            E::NotFound { .. } => ApiError::not_found(msg),
            E::InvalidState { .. } => ApiError::invalid_state(msg),
            E::AlreadyExists { .. } => ApiError::already_exists(msg),
            E::InvalidValue { field, message } => ApiError::invalid_value(&field, message),
            E::InsufficientCapacity(_) => ApiError::insufficient_capacity(msg),
            E::Changed { kind, current } => ApiError::precondition_failed(format!(
                "the {kind} changed since you read it (ETag {})",
                crate::resource::etag(current)
            )),
            E::InUse(_) => ApiError::in_use(msg),
            E::Internal(_) => ApiError::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_statuses_of_the_contract() {
        let cases = [
            (ApiError::bad_request("x"), 400, "bad_request"),
            (ApiError::invalid_value("f", "x"), 400, "invalid_value"),
            (
                ApiError::unsupported_api_version("2.0", "1.0"),
                400,
                "unsupported_api_version",
            ),
            (ApiError::unauthorized("x"), 401, "unauthorized"),
            (ApiError::not_found("x"), 404, "not_found"),
            (ApiError::method_not_allowed("x"), 405, "method_not_allowed"),
            (ApiError::invalid_state("x"), 409, "invalid_state"),
            (ApiError::already_exists("x"), 409, "already_exists"),
            (ApiError::in_use("x"), 409, "in_use"),
            (
                ApiError::precondition_failed("x"),
                412,
                "precondition_failed",
            ),
            (ApiError::too_large("x"), 413, "too_large"),
            (
                ApiError::insufficient_capacity("x"),
                413,
                "insufficient_capacity",
            ),
            (
                ApiError::unsupported_media_type("x"),
                415,
                "unsupported_media_type",
            ),
            (ApiError::internal("boom"), 500, "internal"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{code}");
            assert_eq!(err.code().as_str(), code);
            let json = serde_json::to_value(err.to_body("rid")).unwrap();
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["request_id"], "rid");
        }
    }

    #[test]
    fn internal_does_not_leak_its_detail() {
        let err = ApiError::internal("secret panic text");
        assert!(!err.message().contains("secret"));
        let json = serde_json::to_string(&err.to_body("r")).unwrap();
        assert!(!json.contains("secret"));
    }

    #[test]
    fn invalid_value_names_the_field() {
        let err = ApiError::invalid_value("vcpus", "must be at least 1");
        assert!(err.message().contains("`vcpus`"), "{}", err.message());
    }
}
