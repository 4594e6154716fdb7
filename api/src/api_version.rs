//! The `api-version` request header: a client may name the API version it was written for; one
//! newer than this server's gets 400 `unsupported_api_version`. Every response carries the
//! server's version in the same header.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The API version this server implements.
pub const API_VERSION: &str = "1.0";

/// The request and response header that carries an API version.
pub const API_VERSION_HEADER: HeaderName = HeaderName::from_static("api-version");

/// A `MAJOR.MINOR` API version, ordered numerically (`1.10` > `1.9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl ApiVersion {
    /// Parses `MAJOR` or `MAJOR.MINOR` (digits only).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (major, minor) = match text.split_once('.') {
            Some((major, minor)) => (major, minor),
            None => (text, "0"),
        };
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        Some(Self {
            major: number(major)?,
            minor: number(minor)?,
        })
    }

    /// The version this server implements ([`API_VERSION`]).
    pub fn server() -> Self {
        Self::parse(API_VERSION).expect("API_VERSION is MAJOR.MINOR")
    }
}

/// Middleware: rejects a request whose `api-version` is unparseable or newer than the server's,
/// and tags every response with the server's version.
pub(crate) async fn check(req: Request, next: Next) -> Response {
    let mut response = match req.headers().get(API_VERSION_HEADER) {
        None => next.run(req).await,
        Some(value) => {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match ApiVersion::parse(&text) {
                None => ApiError::bad_request(format!(
                    "invalid api-version header {text:?}: expected MAJOR.MINOR, such as {API_VERSION}"
                ))
                .into_response(),
                Some(v) if v > ApiVersion::server() => {
                    ApiError::unsupported_api_version(text.trim(), API_VERSION).into_response()
                }
                Some(_) => next.run(req).await,
            }
        }
    };
    response
        .headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s| ApiVersion::parse(s).unwrap();
        assert!(v("1.10") > v("1.9"));
        assert!(v("2") > v("1.99"));
        assert_eq!(v("1"), v("1.0"));
        assert!(v("0.9") < ApiVersion::server());
        assert!(v("99.0") > ApiVersion::server());
        for bad in ["", "a", "1.", ".1", "1.2.3", "-1", "1.x", "+1"] {
            assert!(ApiVersion::parse(bad).is_none(), "{bad}");
        }
    }
}
