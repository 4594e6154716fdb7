//! Disk and image routes: each maps onto one `vmm::Manager` call. Imports, uploads and
//! exports are streamed: the body goes through a fixed buffer, never into memory whole.

use std::io::{Read, Write};

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use control::{DiskCreate, DiskPatch, ImageCreate};
use futures_util::TryStreamExt;
use serde::Deserialize;

use crate::error::{ApiError, ErrorBody};
use crate::instances::{blocking, if_match, with_etag, Mgr};
use crate::json::ApiJson;
use crate::listing::{self, ListQuery};

#[utoipa::path(get, path = "/v1/disks", tag = "disks", params(ListQuery),
    responses((status = 200, description = "The disks (a page of them with `limit`; the next page's token in `x-next-page-token`)")))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let disks = blocking(move || Ok(m.disks())).await?;
    let items: Vec<_> = disks
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
        .collect();
    listing::respond(items, &q, &headers)
}

#[utoipa::path(post, path = "/v1/disks", tag = "disks",
    request_body(content = Object, description = "{name, size, block_size, format: raw|qcow2, source: {type: blank} | {type: image, image} | {type: disk, disk}}"),
    responses((status = 201, description = "Created"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn create(
    Mgr(m): Mgr,
    ApiJson(spec): ApiJson<DiskCreate>,
) -> Result<Response, ApiError> {
    let disk = blocking(move || m.create_disk(spec).map_err(ApiError::from)).await?;
    let mut r = with_etag(StatusCode::CREATED, &disk, &disk.etag());
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/disks/{}", disk.def.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

#[utoipa::path(get, path = "/v1/disks/{disk}", tag = "disks", params(("disk" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The disk, with an ETag"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Response, ApiError> {
    let disk = blocking(move || m.disk(&key).map_err(ApiError::from)).await?;
    Ok(with_etag(StatusCode::OK, &disk, &disk.etag()))
}

#[utoipa::path(patch, path = "/v1/disks/{disk}", tag = "disks",
    params(("disk" = String, Path, description = "Id or name"), ("If-Match" = Option<String>, Header, description = "ETag from GET")),
    request_body(content = Object, description = "{name, description, size (grow only, detached only)}"),
    responses((status = 200, description = "The disk"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub(crate) async fn patch(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    headers: HeaderMap,
    ApiJson(p): ApiJson<DiskPatch>,
) -> Result<Response, ApiError> {
    let tag = if_match(&headers);
    let disk = blocking(move || {
        m.patch_disk(&key, p, tag.as_deref())
            .map_err(ApiError::from)
    })
    .await?;
    Ok(with_etag(StatusCode::OK, &disk, &disk.etag()))
}

#[utoipa::path(delete, path = "/v1/disks/{disk}", tag = "disks", params(("disk" = String, Path, description = "Id or name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn delete(Mgr(m): Mgr, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_disk(&key).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The request body as a blocking reader (for `spawn_blocking`).
fn body_reader(body: Body) -> impl Read + Send + 'static {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ImportQuery {
    /// Name of the new disk.
    name: String,
    /// Format to store it in (`raw` by default); the stream may be raw or qcow2.
    format: Option<String>,
}

#[utoipa::path(post, path = "/v1/disks/import", tag = "disks", params(ImportQuery),
    request_body(content = Vec<u8>, description = "The image bytes (raw or self-contained qcow2), streamed", content_type = "application/octet-stream"),
    responses((status = 201, description = "The new disk"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn import(
    Mgr(m): Mgr,
    Query(q): Query<ImportQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut reader = body_reader(body);
    let disk = blocking(move || {
        m.import_disk(&q.name, q.format.as_deref(), &mut reader, &mut |_| {})
            .map_err(ApiError::from)
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &disk, &disk.etag()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// `raw` (default) or `qcow2` (allocated clusters only).
    format: Option<String>,
}

/// Sends what it is given to the response body, a chunk at a time.
struct ChannelWriter(tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(buf.to_vec()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[utoipa::path(get, path = "/v1/disks/{disk}/export", tag = "disks", params(("disk" = String, Path, description = "Id or name"), ExportQuery),
    responses((status = 200, description = "The disk's content, streamed", content_type = "application/octet-stream"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn export(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    // Refusals come as errors before the first byte; later failures cut the stream short.
    let (m2, k2, f2) = (m.clone(), key.clone(), q.format.clone());
    let disk =
        blocking(move || m2.check_export(&k2, f2.as_deref()).map_err(ApiError::from)).await?;
    let raw = q.format.as_deref().unwrap_or("raw") == "raw";
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        // Whole writes of up to the exporter's buffer size go out as one chunk.
        let mut out = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx.clone()));
        let r = m
            .export_disk(&key, q.format.as_deref(), &mut out)
            .map_err(|e| e.to_string())
            .and_then(|_| out.flush().map_err(|e| e.to_string()));
        if let Err(e) = r {
            tracing::warn!("export of disk {key}: {e}");
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if raw {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(disk.def.size));
    }
    Ok(r)
}

#[utoipa::path(get, path = "/v1/images", tag = "images", params(ListQuery),
    responses((status = 200, description = "The images, kiln-probe first")))]
pub(crate) async fn images(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let items: Vec<_> = m
        .images()
        .into_iter()
        .filter(|i| q.name.as_deref().is_none_or(|n| i.name == n))
        .collect();
    listing::respond(items, &q, &headers)
}

#[utoipa::path(post, path = "/v1/images", tag = "images",
    request_body(content = Object, description = "{name, kind: kernel|initrd|disk, path: a file inside an --image-dir}"),
    responses((status = 201, description = "Registered"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn add_image(
    Mgr(m): Mgr,
    ApiJson(spec): ApiJson<ImageCreate>,
) -> Result<Response, ApiError> {
    let img = blocking(move || m.add_image(spec).map_err(ApiError::from)).await?;
    Ok((StatusCode::CREATED, Json(img)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadQuery {
    /// Name of the new image.
    name: String,
    /// `kernel`, `initrd` or `disk`.
    kind: String,
}

#[utoipa::path(post, path = "/v1/images/upload", tag = "images", params(UploadQuery),
    request_body(content = Vec<u8>, description = "The image file, streamed", content_type = "application/octet-stream"),
    responses((status = 201, description = "Registered"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn upload_image(
    Mgr(m): Mgr,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut reader = body_reader(body);
    let img = blocking(move || {
        m.upload_image(&q.name, &q.kind, &mut reader)
            .map_err(ApiError::from)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(img)).into_response())
}

#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The image"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_image(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(m.image(&key)?).into_response())
}

#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path, description = "Id or name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn delete_image(
    Mgr(m): Mgr,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_image(&key).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}
