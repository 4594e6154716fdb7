//! Request ids: every request gets one (a valid incoming `x-request-id` is kept, otherwise a new
//! UUID), every response carries it in `x-request-id`, and it is the `request_id` field of
//! tracing's per-request span.
//!
//! Handlers get it with the [`RequestId`] extractor; code running inside a request (such as
//! [`crate::ApiError`]'s rendering) gets it with [`RequestId::current`].

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header that carries the request id, both ways.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest incoming request id that is kept as is.
const MAX_INCOMING_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: RequestId;
}

/// The id of one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// A new random id (a UUID v4).
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().to_string().into())
    }

    /// The id a client sent in `x-request-id`, if it is acceptable: 1 to 128 characters of
    /// `[A-Za-z0-9._:-]`. Anything else is ignored (and a new id is made).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
        let ok = !value.is_empty()
            && value.len() <= MAX_INCOMING_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| Self(value.into()))
    }

    /// The incoming id if acceptable, else a new one.
    pub fn from_headers_or_new(headers: &HeaderMap) -> Self {
        Self::from_headers(headers).unwrap_or_default()
    }

    /// The id of the request being served by the current task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// The id of the request being served, or a new one outside of a request.
    pub fn current_or_new() -> Self {
        Self::current().unwrap_or_default()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `fut` with this id as the current request id.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// Sets the `x-request-id` header of `response` to this id.
    pub(crate) fn tag(&self, response: &mut Response) {
        if let Ok(value) = HeaderValue::from_str(&self.0) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .or_else(Self::current)
            .unwrap_or_default())
    }
}

/// Middleware: assigns the request id, runs the request in a tracing span and with the id as
/// [`RequestId::current`], logs the outcome, and tags the response with `x-request-id`.
pub(crate) async fn assign(mut req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(|| RequestId::from_headers_or_new(req.headers()));
    req.extensions_mut().insert(id.clone());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let started = Instant::now();
    let mut response = id
        .clone()
        .scope(next.run(req).instrument(span.clone()))
        .await;
    // The access log: one line per request at the default level (`kiln serve` logs `info`).
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::info!(
            target: "access",
            status = response.status().as_u16(),
            "{} {} {} {:.1}ms",
            method,
            path,
            response.status().as_u16(),
            elapsed.as_secs_f64() * 1e3,
        )
    });
    id.tag(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn a_valid_incoming_id_is_kept() {
        let id = RequestId::from_headers(&headers("abc-123_x.y:z")).unwrap();
        assert_eq!(id.as_str(), "abc-123_x.y:z");
    }

    #[test]
    fn an_invalid_incoming_id_is_replaced() {
        assert!(RequestId::from_headers(&headers("has space")).is_none());
        assert!(RequestId::from_headers(&headers("")).is_none());
        assert!(RequestId::from_headers(&headers(&"a".repeat(129))).is_none());
        let fresh = RequestId::from_headers_or_new(&headers("bad\"quote"));
        assert!(uuid::Uuid::parse_str(fresh.as_str()).is_ok());
    }

    #[tokio::test]
    async fn current_is_set_inside_scope_only() {
        assert!(RequestId::current().is_none());
        let id = RequestId::new();
        let seen = id.clone().scope(async { RequestId::current() }).await;
        assert_eq!(seen, Some(id));
    }
}
