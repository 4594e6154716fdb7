//! Keeps every error response in the JSON shape of [`crate::ApiError`], whatever produced it:
//! the 404 fallback for unknown paths, axum's own 405 and rejections (reshaped by
//! [`normalize`]), and panics in handlers (turned into 500 `internal` by [`panic_response`]).

use std::any::Any;

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode, ErrorRendered};

/// Longest plain-text error body that is carried over into the JSON message.
const MAX_TEXT: usize = 4096;

/// Fallback handler: 404 `not_found` naming the path.
pub(crate) async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such path: {method} {}", uri.path()))
}

/// Response for a panic caught in a handler: 500 `internal`; the panic message goes to the
/// log with the request id, never to the client.
pub(crate) fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string panic payload)");
    ApiError::internal(format!("handler panicked: {text}")).into_response()
}

/// Middleware: an error response (status ≥ 400) that is not already an [`ApiError`] is
/// rewritten into the JSON error shape, keeping its status and headers (such as `Allow`).
pub(crate) async fn normalize(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let status = response.status();
    if status.as_u16() < 400 || response.extensions().get::<ErrorRendered>().is_some() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_TEXT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let code = ErrorCode::for_status(status);
    let error = match code {
        ErrorCode::MethodNotAllowed => {
            // axum adds `Allow` outside the route's middleware, so it is usually not here yet;
            // it still reaches the client.
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .map(|allowed| format!("; allowed: {allowed}"))
                .unwrap_or_default();
            ApiError::method_not_allowed(format!(
                "method {method} is not allowed on {path}{allowed}"
            ))
        }
        ErrorCode::NotFound if text.is_empty() => {
            ApiError::not_found(format!("no such path: {method} {path}"))
        }
        ErrorCode::Internal => ApiError::internal(format!("{status}: {text}")),
        _ if text.is_empty() => ApiError::new(
            code,
            status.canonical_reason().unwrap_or("error").to_lowercase(),
        ),
        _ => ApiError::new(code, text),
    };
    let mut reshaped = error.into_response();
    *reshaped.status_mut() = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    for name in parts.headers.keys() {
        if name == header::CONTENT_LENGTH || reshaped.headers().contains_key(name) {
            continue;
        }
        for value in parts.headers.get_all(name) {
            reshaped.headers_mut().append(name.clone(), value.clone());
        }
    }
    reshaped
}
