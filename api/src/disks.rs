//! Disk routes: list, create, import, get, change, delete, export. Each maps onto one call of
//! the control plane's `Manager`; imports and exports are streamed.

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::listing::{self, ListQuery, ListedDisk};
use crate::plane::{blocking, Mgr};
use crate::resource::if_match;
use crate::respond::{created, tagged};
use crate::streaming::{body_reader, body_writer};
use crate::wire::{Disk, DiskCreate, DiskFormat, DiskPatch};

/// The disks, oldest first.
///
/// `state` keeps the `attached` or the `detached` ones, `name` the one of that name.
#[utoipa::path(get, path = "/v1/disks", tag = "disks", operation_id = "disk_list",
    params(ListQuery),
    responses(
        (status = 200, description = "The disks (a page of them with `limit`)",
            content(([ListedDisk] = "application/json"), (String = "application/x-ndjson")),
            headers(("x-next-page-token" = String, description = "The `page_token` of the next page, when there is one"))),
        (status = 400, description = "`bad_request`: an unknown query parameter; `invalid_value`: a bad `limit`, `page_token`, `state` or `fields` (named)", body = ErrorBody),
    ))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    q.check_state(&["attached", "detached"])?;
    let disks = blocking(move || Ok(m.disks())).await?;
    let items: Vec<Disk> = disks
        .into_iter()
        .filter(|d| {
            let state = if d.attached_to.is_some() {
                "attached"
            } else {
                "detached"
            };
            q.state.as_deref().is_none_or(|s| s == state)
        })
        .filter(|d| q.name.as_deref().is_none_or(|n| d.def.name == n))
        .map(Disk::from)
        .collect();
    listing::respond(items, &q, &headers)
}

/// Creates a disk: blank (sparse), from an image (a qcow2 overlay on it, or a raw copy) or a
/// copy of another disk.
#[utoipa::path(post, path = "/v1/disks", tag = "disks", operation_id = "disk_create",
    request_body(content = DiskCreate, description = "The new disk",
        example = json!({"name": "data", "size": "64MiB", "format": "qcow2", "source": {"type": "blank"}})),
    responses(
        (status = 201, description = "Created", body = Disk,
            headers(("ETag" = String, description = "The definition's entity tag, for `If-Match`"),
                    ("Location" = String, description = "The new disk's path")),
            links(
                ("get" = (operation_id = "disk_get", parameters(("disk" = "$response.body#/id")), description = "The disk")),
                ("update" = (operation_id = "disk_update", parameters(("disk" = "$response.body#/id")), description = "Change it")),
                ("export" = (operation_id = "disk_export", parameters(("disk" = "$response.body#/id")), description = "Its content")),
                ("delete" = (operation_id = "disk_delete", parameters(("disk" = "$response.body#/id")), description = "Delete it")),
            )),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: its source image went away while it was made", body = ErrorBody),
        (status = 409, description = "`already_exists` (the name) or `in_use` (the source disk's instance runs)", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: the host's file system cannot hold the disk, or `too_large`", body = ErrorBody),
    ))]
pub(crate) async fn create(
    Mgr(m): Mgr,
    ApiJson(spec): ApiJson<DiskCreate>,
) -> Result<Response, ApiError> {
    let disk = blocking(move || m.create_disk(spec.into())).await?;
    Ok(created(disk))
}

/// One disk, by id or name.
#[utoipa::path(get, path = "/v1/disks/{disk}", tag = "disks", operation_id = "disk_get",
    params(("disk" = String, Path, description = "The disk's id or name")),
    responses(
        (status = 200, description = "The disk", body = Disk,
            headers(("ETag" = String, description = "The definition's entity tag, for `If-Match`"))),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
    ))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Response, ApiError> {
    let disk = blocking(move || m.disk(&key)).await?;
    Ok(tagged(StatusCode::OK, disk))
}

/// Renames, re-describes or grows a disk (it only grows, and only while detached). With
/// `If-Match`, only if the definition has not changed since.
#[utoipa::path(patch, path = "/v1/disks/{disk}", tag = "disks", operation_id = "disk_update",
    params(("disk" = String, Path, description = "The disk's id or name")),
    request_body(content = DiskPatch, description = "The fields to change",
        example = json!({"size": "128MiB"})),
    responses(
        (status = 200, description = "The disk, changed", body = Disk,
            headers(("ETag" = String, description = "The definition's new entity tag"))),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
        (status = 409, description = "`already_exists` (the new name) or `in_use` (growing an attached disk)", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: the host's file system cannot hold the disk grown, or `too_large`", body = ErrorBody),
    ))]
pub(crate) async fn patch(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    headers: HeaderMap,
    ApiJson(p): ApiJson<DiskPatch>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers);
    let disk = blocking(move || m.patch_disk(&key, p.into(), expected)).await?;
    Ok(tagged(StatusCode::OK, disk))
}

/// Deletes a detached disk and its file.
#[utoipa::path(delete, path = "/v1/disks/{disk}", tag = "disks", operation_id = "disk_delete",
    params(("disk" = String, Path, description = "The disk's id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
        (status = 409, description = "`in_use`: attached to an instance, or being copied or exported", body = ErrorBody),
    ))]
pub(crate) async fn delete(Mgr(m): Mgr, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_disk(&key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Options of `POST /v1/disks/import`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ImportQuery {
    /// Name of the new disk.
    name: String,
    /// Format to store it in (`raw` by default); the stream may be raw or qcow2 either way.
    format: Option<DiskFormat>,
}

/// Creates a disk from the streamed request body: a raw image, or a self-contained qcow2.
#[utoipa::path(post, path = "/v1/disks/import", tag = "disks", operation_id = "disk_import",
    params(ImportQuery),
    request_body(content = Vec<u8>, description = "The image's bytes, streamed", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "The new disk", body = Disk,
            headers(("ETag" = String, description = "The definition's entity tag, for `If-Match`"),
                    ("Location" = String, description = "The new disk's path"))),
        (status = 400, description = "`invalid_value`: the name, or a stream that is not a usable image (names `body`)", body = ErrorBody),
        (status = 409, description = "`already_exists`: the name is taken", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: the host's file system cannot hold the disk", body = ErrorBody),
    ))]
pub(crate) async fn import(
    Mgr(m): Mgr,
    Query(q): Query<ImportQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut reader = body_reader(body);
    let format = q.format.unwrap_or(DiskFormat::Raw).into();
    let disk = blocking(move || m.import_disk(&q.name, format, &mut reader)).await?;
    Ok(created(disk))
}

/// Options of `GET /v1/disks/{disk}/export`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// `raw` (default: every byte of the disk) or `qcow2` (its allocated clusters only).
    format: Option<DiskFormat>,
}

/// The disk's content as a stream. Refused while an instance it is attached to runs.
#[utoipa::path(get, path = "/v1/disks/{disk}/export", tag = "disks", operation_id = "disk_export",
    params(("disk" = String, Path, description = "The disk's id or name"), ExportQuery),
    responses(
        (status = 200, description = "The disk's content, streamed (cut short if reading fails)", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("Content-Length" = u64, description = "For a raw export: the disk's size"))),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
        (status = 409, description = "`in_use`: attached to an instance that runs", body = ErrorBody),
    ))]
pub(crate) async fn export(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    // Refusals come as errors before the first byte; later failures cut the stream short.
    let format = q.format.unwrap_or(DiskFormat::Raw);
    let export = blocking(move || m.export_disk(&key, format.into())).await?;
    let length = (format == DiskFormat::Raw).then_some(export.size);
    let (mut out, body) = body_writer();
    tokio::task::spawn_blocking(move || {
        match export.write_to(&mut out).map_err(|e| e.to_string()) {
            Ok(_) => {
                if let Err(e) = out.finish() {
                    tracing::warn!("export: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("export: {e}");
                out.fail(e);
            }
        }
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(r)
}
