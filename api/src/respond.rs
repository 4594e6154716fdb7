//! Responses that carry a resource: its wire form, its `ETag`, and for a new one its
//! `Location`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use control::Revision;
use serde::Serialize;

use crate::resource::{disk_path, etag, instance_path};

/// A view of the control plane that has a revision (its `ETag`) and a path.
pub(crate) trait Resource: Sized {
    /// Its wire form.
    type Wire: From<Self> + Serialize;
    /// The definition's revision.
    fn revision(&self) -> Revision;
    /// Its path.
    fn path(&self) -> String;
}

impl Resource for control::InstanceView {
    type Wire = crate::wire::Instance;
    fn revision(&self) -> Revision {
        self.def.revision()
    }
    fn path(&self) -> String {
        instance_path(self.def.id)
    }
}

impl Resource for control::DiskView {
    type Wire = crate::wire::Disk;
    fn revision(&self) -> Revision {
        self.def.revision()
    }
    fn path(&self) -> String {
        disk_path(self.def.id)
    }
}

/// The resource's wire form with its `ETag`.
pub(crate) fn tagged<R: Resource>(status: StatusCode, view: R) -> Response {
    let tag = etag(view.revision());
    let mut r = (status, Json(R::Wire::from(view))).into_response();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// `201 Created` with the new resource, its `ETag` and its `Location`.
pub(crate) fn created<R: Resource>(view: R) -> Response {
    let path = view.path();
    let mut r = tagged(StatusCode::CREATED, view);
    with_location(&mut r, &path);
    r
}

/// Sets the `Location` header.
pub(crate) fn with_location(r: &mut Response, location: &str) {
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
}
