//! Image routes: list, register (from an image directory or uploaded), get, delete.

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::listing::{self, ListQuery, ListedImage};
use crate::plane::{blocking, Mgr};
use crate::resource::image_path;
use crate::respond::with_location;
use crate::streaming::body_reader;
use crate::wire::{Image, ImageCreate, ImageKind, ImageSourceSpec};

/// The images, `kiln-probe` first.
#[utoipa::path(get, path = "/v1/images", tag = "images", operation_id = "image_list",
    params(ListQuery),
    responses(
        (status = 200, description = "The images (a page of them with `limit`)",
            content(([ListedImage] = "application/json"), (String = "application/x-ndjson")),
            headers(("x-next-page-token" = String, description = "The `page_token` of the next page, when there is one"))),
        (status = 400, description = "`bad_request`: an unknown query parameter; `invalid_value`: a bad `limit`, `page_token`, `state` or `fields` (named)", body = ErrorBody),
    ))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    q.check_state(&[])?;
    let items: Vec<Image> = m
        .images()
        .into_iter()
        .filter(|i| q.name.as_deref().is_none_or(|n| i.name == n))
        .map(Image::from)
        .collect();
    listing::respond(items, &q, &headers)
}

fn created(img: control::Image) -> Response {
    let img = Image::from(img);
    let mut r = (StatusCode::CREATED, Json(&img)).into_response();
    with_location(&mut r, &image_path(img.id));
    r
}

/// Registers a file inside one of the server's image directories (`kiln serve --image-dir`)
/// as an image (Kiln never writes it), or makes a disk image in the state directory from a
/// snapshot of a disk (`source`).
#[utoipa::path(post, path = "/v1/images", tag = "images", operation_id = "image_create",
    request_body(content = ImageCreate, description = "The image"),
    responses(
        (status = 201, description = "Registered", body = Image,
            headers(("Location" = String, description = "The new image's path"))),
        (status = 400, description = "`invalid_value`: the name, a path outside the image directories or not of its kind, neither or both of `path` and `source`, a disk or snapshot that does not exist", body = ErrorBody),
        (status = 409, description = "`already_exists`: the name is taken; `in_use`: the snapshot's disk is attached to an instance that is not stopped", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: the host's file system cannot hold the copy", body = ErrorBody),
    ))]
pub(crate) async fn create(
    Mgr(m): Mgr,
    ApiJson(spec): ApiJson<ImageCreate>,
) -> Result<Response, ApiError> {
    let refuse = |field: &str, message: &str| control::Error::InvalidValue {
        field: field.into(),
        message: message.into(),
    };
    let img = match (spec.path, spec.source) {
        (Some(path), None) => {
            let new = control::NewImage {
                name: spec.name,
                kind: spec.kind.into(),
                path: path.into(),
                description: spec.description,
            };
            blocking(move || m.add_image(new)).await?
        }
        (None, Some(ImageSourceSpec::Snapshot { disk, snapshot })) => {
            if control::ImageKind::from(spec.kind) != control::ImageKind::Disk {
                Err(refuse(
                    "kind",
                    "an image made from a disk snapshot is a disk image",
                ))?;
            }
            blocking(move || {
                m.image_from_disk_snapshot(&spec.name, &spec.description, &disk, &snapshot)
            })
            .await?
        }
        (Some(_), Some(_)) => Err(refuse("source", "give path or source, not both"))?,
        (None, None) => Err(refuse(
            "path",
            "give path (a file) or source (a disk snapshot)",
        ))?,
    };
    Ok(created(img))
}

/// Options of `POST /v1/images/upload`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadQuery {
    /// Name of the new image.
    name: String,
    /// What it is for.
    kind: ImageKind,
}

/// Registers an image from the streamed request body, stored in the state directory. A disk
/// image is validated and kept in its own format.
#[utoipa::path(post, path = "/v1/images/upload", tag = "images", operation_id = "image_upload",
    params(UploadQuery),
    request_body(content = Vec<u8>, description = "The image file, streamed", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Registered", body = Image,
            headers(("Location" = String, description = "The new image's path"))),
        (status = 400, description = "`invalid_value`: the name, or a stream that is not a usable image of its kind", body = ErrorBody),
        (status = 409, description = "`already_exists`: the name is taken", body = ErrorBody),
    ))]
pub(crate) async fn upload(
    Mgr(m): Mgr,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut reader = body_reader(body);
    let img = blocking(move || m.upload_image(&q.name, q.kind.into(), &mut reader)).await?;
    Ok(created(img))
}

/// One image, by id or name.
#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", operation_id = "image_get",
    params(("image" = String, Path, description = "The image's id or name")),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 404, description = "`not_found`: no such image", body = ErrorBody),
    ))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Json<Image>, ApiError> {
    Ok(Json(m.image(&key)?.into()))
}

/// Deletes an image no instance boots from and no disk is an overlay on.
#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", operation_id = "image_delete",
    params(("image" = String, Path, description = "The image's id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such image", body = ErrorBody),
        (status = 409, description = "`in_use`: built in, booted from, or the base of a disk", body = ErrorBody),
    ))]
pub(crate) async fn delete(Mgr(m): Mgr, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_image(&key)).await?;
    Ok(StatusCode::NO_CONTENT)
}
