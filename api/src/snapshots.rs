//! Snapshot routes: instance snapshots (take, list, get, delete), disk snapshots (take, list,
//! get, delete, roll back), and the restore half of `POST /v1/instances`. Each maps onto one
//! call of the control plane's `Manager`.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::plane::{blocking, Mgr};
use crate::respond::{created, tagged, with_location};
use crate::wire::{
    CreatedInstances, Disk, DiskSnapshot, DiskSnapshotCreate, Instance, InstanceRestore, Snapshot,
    SnapshotCreate,
};

/// The path of an instance snapshot.
fn snapshot_path(id: uuid::Uuid) -> String {
    format!("/v1/snapshots/{id}")
}

/// Takes a snapshot of a running or paused instance: it is paused, its memory, machine state,
/// a copy of each disk and its console history are saved, then it resumes (or, with `stop`,
/// is stopped).
#[utoipa::path(post, path = "/v1/instances/{instance}/snapshots", tag = "snapshots", operation_id = "instance_snapshot_create",
    params(("instance" = String, Path, description = "The instance's id or name")),
    request_body(content = SnapshotCreate, description = "The new snapshot",
        example = json!({"name": "warm"})),
    responses(
        (status = 201, description = "Taken", body = Snapshot,
            headers(("Location" = String, description = "The snapshot's path"))),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
        (status = 409, description = "`invalid_state` (it does not run) or `already_exists` (the name)", body = ErrorBody),
    ))]
pub(crate) async fn take(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    ApiJson(spec): ApiJson<SnapshotCreate>,
) -> Result<Response, ApiError> {
    let view = blocking(move || {
        m.take_snapshot(
            &key,
            control::NewSnapshot {
                name: spec.name,
                description: spec.description,
                stop: spec.stop,
            },
        )
    })
    .await?;
    let path = snapshot_path(view.def.id);
    let mut r = (StatusCode::CREATED, Json(Snapshot::from(view))).into_response();
    with_location(&mut r, &path);
    Ok(r)
}

/// The instance snapshots, oldest first.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", operation_id = "snapshot_list",
    responses(
        (status = 200, description = "The instance snapshots", body = [Snapshot]),
    ))]
pub(crate) async fn list(Mgr(m): Mgr) -> Result<Json<Vec<Snapshot>>, ApiError> {
    let all = blocking(move || Ok(m.snapshots())).await?;
    Ok(Json(all.into_iter().map(Snapshot::from).collect()))
}

/// One instance snapshot, by id or name.
#[utoipa::path(get, path = "/v1/snapshots/{snapshot}", tag = "snapshots", operation_id = "snapshot_get",
    params(("snapshot" = String, Path, description = "The snapshot's id or name")),
    responses(
        (status = 200, description = "The snapshot", body = Snapshot),
        (status = 404, description = "`not_found`: no such snapshot", body = ErrorBody),
    ))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Json<Snapshot>, ApiError> {
    let s = blocking(move || m.snapshot(&key)).await?;
    Ok(Json(s.into()))
}

/// Deletes an instance snapshot and its files; refused while disks made from it exist or an
/// instance waits to be restored from it.
#[utoipa::path(delete, path = "/v1/snapshots/{snapshot}", tag = "snapshots", operation_id = "snapshot_delete",
    params(("snapshot" = String, Path, description = "The snapshot's id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such snapshot", body = ErrorBody),
        (status = 409, description = "`in_use`: disks are made from it, or an instance is to be restored from it", body = ErrorBody),
    ))]
pub(crate) async fn delete(Mgr(m): Mgr, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_snapshot(&key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates instances from a snapshot (`POST /v1/instances` with a `source`): answers the
/// instance, or with `count` the clones.
pub(crate) async fn restore(
    m: std::sync::Arc<control::Manager>,
    spec: InstanceRestore,
) -> Result<Response, ApiError> {
    let many = spec.count.is_some();
    let mut made = blocking(move || m.restore(spec.into())).await?;
    if many {
        let all: Vec<Instance> = made.into_iter().map(|(v, _)| v.into()).collect();
        return Ok((StatusCode::CREATED, Json(CreatedInstances::Many(all))).into_response());
    }
    let (view, _) = made
        .pop()
        .ok_or_else(|| ApiError::internal("a restore made no instance"))?;
    Ok(created(view))
}

/// Takes a snapshot of a disk, also while its instance runs (crash-consistent: every write
/// the guest saw complete is in it, none after; the guest keeps running). A qcow2 disk keeps
/// it inside its file; a raw disk's is a reflink or a copy.
#[utoipa::path(post, path = "/v1/disks/{disk}/snapshots", tag = "snapshots", operation_id = "disk_snapshot_create",
    params(("disk" = String, Path, description = "The disk's id or name")),
    request_body(content = DiskSnapshotCreate, description = "The new snapshot",
        example = json!({"name": "before-upgrade"})),
    responses(
        (status = 201, description = "Taken", body = DiskSnapshot,
            headers(("Location" = String, description = "The snapshot's path"))),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
        (status = 409, description = "`already_exists` (the name) or `in_use` (its instance is between states, or the disk is being copied)", body = ErrorBody),
    ))]
pub(crate) async fn disk_take(
    Mgr(m): Mgr,
    Path(disk): Path<String>,
    ApiJson(spec): ApiJson<DiskSnapshotCreate>,
) -> Result<Response, ApiError> {
    let s = blocking(move || m.create_disk_snapshot(&disk, &spec.name)).await?;
    let path = format!("/v1/disks/{}/snapshots/{}", s.disk, s.name);
    let mut r = (StatusCode::CREATED, Json(DiskSnapshot::from(s))).into_response();
    with_location(&mut r, &path);
    Ok(r)
}

/// The snapshots of a disk, oldest first.
#[utoipa::path(get, path = "/v1/disks/{disk}/snapshots", tag = "snapshots", operation_id = "disk_snapshot_list",
    params(("disk" = String, Path, description = "The disk's id or name")),
    responses(
        (status = 200, description = "Its snapshots", body = [DiskSnapshot]),
        (status = 404, description = "`not_found`: no such disk", body = ErrorBody),
    ))]
pub(crate) async fn disk_list(
    Mgr(m): Mgr,
    Path(disk): Path<String>,
) -> Result<Json<Vec<DiskSnapshot>>, ApiError> {
    let all = blocking(move || m.disk_snapshots(&disk)).await?;
    Ok(Json(all.into_iter().map(DiskSnapshot::from).collect()))
}

/// One snapshot of a disk.
#[utoipa::path(get, path = "/v1/disks/{disk}/snapshots/{snapshot}", tag = "snapshots", operation_id = "disk_snapshot_get",
    params(("disk" = String, Path, description = "The disk's id or name"),
           ("snapshot" = String, Path, description = "The snapshot's name")),
    responses(
        (status = 200, description = "The snapshot", body = DiskSnapshot),
        (status = 404, description = "`not_found`: no such disk or snapshot", body = ErrorBody),
    ))]
pub(crate) async fn disk_get(
    Mgr(m): Mgr,
    Path((disk, name)): Path<(String, String)>,
) -> Result<Json<DiskSnapshot>, ApiError> {
    let s = blocking(move || m.disk_snapshot(&disk, &name)).await?;
    Ok(Json(s.into()))
}

/// Deletes a snapshot of a disk that no running instance has.
#[utoipa::path(delete, path = "/v1/disks/{disk}/snapshots/{snapshot}", tag = "snapshots", operation_id = "disk_snapshot_delete",
    params(("disk" = String, Path, description = "The disk's id or name"),
           ("snapshot" = String, Path, description = "The snapshot's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such disk or snapshot", body = ErrorBody),
        (status = 409, description = "`in_use`: its instance runs, or the disk is being copied", body = ErrorBody),
    ))]
pub(crate) async fn disk_delete(
    Mgr(m): Mgr,
    Path((disk, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete_disk_snapshot(&disk, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rolls a disk back to one of its snapshots: the disk must be detached or its instance
/// stopped. What was written since is lost; the snapshot stays.
#[utoipa::path(post, path = "/v1/disks/{disk}/snapshots/{snapshot}/rollback", tag = "snapshots", operation_id = "disk_snapshot_rollback",
    params(("disk" = String, Path, description = "The disk's id or name"),
           ("snapshot" = String, Path, description = "The snapshot's name")),
    responses(
        (status = 200, description = "The disk, rolled back", body = Disk,
            headers(("ETag" = String, description = "The definition's entity tag"))),
        (status = 404, description = "`not_found`: no such disk or snapshot", body = ErrorBody),
        (status = 409, description = "`in_use`: its instance runs, or the disk is being copied", body = ErrorBody),
    ))]
pub(crate) async fn disk_rollback(
    Mgr(m): Mgr,
    Path((disk, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let d = blocking(move || m.rollback_disk(&disk, &name)).await?;
    Ok(tagged(StatusCode::OK, d))
}
