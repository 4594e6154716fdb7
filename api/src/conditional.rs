//! Conditional GETs: `If-None-Match` answered with `304 Not Modified`.
//!
//! A resource's `ETag` names its definition's revision (what `If-Match` guards), but what GET
//! answers also carries state that changes without a new revision (an instance's `state`, a
//! disk's `actual_size`). So the `ETag` of a GET answer is the revision's tag with a hash of
//! the body after a dot (`"<id>-<generation>.<hash>"`): it changes whenever the answer does,
//! `If-None-Match` compares it whole, and `If-Match` reads only the revision in it
//! ([`crate::resource::if_match`]).

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Largest GET answer whose `ETag` gets the body's hash (resources are a few KiB).
const HASHED_LIMIT: usize = 1 << 20;

/// Middleware: on GET answers with an `ETag`, adds the body's hash to it, and answers 304
/// when `If-None-Match` names it (or is `*`).
pub(crate) async fn not_modified(req: Request, next: Next) -> Response {
    if req.method() != Method::GET {
        return next.run(req).await;
    }
    let wanted = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let response = next.run(req).await;
    let Some(tag) = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
    else {
        return response;
    };
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, HASHED_LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let tag = format!("\"{}.{:016x}\"", tag.trim_matches('"'), fnv1a(&bytes));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        parts.headers.insert(header::ETAG, v);
    }
    if wanted.is_some_and(|w| matches(&w, &tag)) {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        for name in [header::ETAG, header::CACHE_CONTROL] {
            if let Some(v) = parts.headers.get(&name) {
                r.headers_mut().insert(name, v.clone());
            }
        }
        return r;
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// True when an `If-None-Match` value names `tag` (weak comparison) or is `*`.
fn matches(wanted: &str, tag: &str) -> bool {
    wanted
        .split(',')
        .map(str::trim)
        .any(|w| w == "*" || w.strip_prefix("W/").unwrap_or(w) == tag)
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_and_weak_tags() {
        assert!(matches("\"a.1\"", "\"a.1\""));
        assert!(matches("W/\"a.1\"", "\"a.1\""));
        assert!(matches("\"x\", \"a.1\"", "\"a.1\""));
        assert!(matches("*", "\"a.1\""));
        assert!(!matches("\"a.2\"", "\"a.1\""));
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
