//! Responses that carry a resource: its JSON, its `ETag`, and for a new one its `Location`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use control::Revision;

use crate::resource::etag;

/// A JSON response with the `ETag` of `revision`.
pub(crate) fn with_etag(
    status: StatusCode,
    body: &impl serde::Serialize,
    revision: Revision,
) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(revision)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// `201 Created` with the resource, its `ETag` and its `Location`.
pub(crate) fn created(
    body: &impl serde::Serialize,
    revision: Revision,
    location: &str,
) -> Response {
    let mut r = with_etag(StatusCode::CREATED, body, revision);
    with_location(&mut r, location);
    r
}

/// Sets the `Location` header.
pub(crate) fn with_location(r: &mut Response, location: &str) {
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
}
