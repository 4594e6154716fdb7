//! Instance routes: list, create, get, change, delete, actions, attach and detach. Each maps
//! onto one call of the control plane's `Manager`.

use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::listing::{self, ListQuery, ListedInstance};
use crate::plane::{blocking, Mgr};
use crate::resource::{if_match, operation_path};
use crate::respond::{created, tagged, with_location};
use crate::wire::{
    ActionRequest, AttachRequest, CreatedInstances, Instance, InstanceCreate,
    InstanceCreateRequest, InstancePatch, Operation,
};

/// The instances, oldest first.
///
/// `state` keeps those in one state (`running`, …), `name` the one of that name.
#[utoipa::path(get, path = "/v1/instances", tag = "instances", operation_id = "instance_list",
    params(ListQuery),
    responses(
        (status = 200, description = "The instances (a page of them with `limit`)",
            content(([ListedInstance] = "application/json"), (String = "application/x-ndjson")),
            headers(("x-next-page-token" = String, description = "The `page_token` of the next page, when there is one"))),
        (status = 400, description = "`bad_request`: an unknown query parameter; `invalid_value`: a bad `limit`, `page_token`, `state` or `fields` (named)", body = ErrorBody),
    ))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let states: Vec<&str> = control::InstanceState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    q.check_state(&states)?;
    let items: Vec<Instance> = m
        .list()
        .into_iter()
        .filter(|i| {
            q.state
                .as_deref()
                .is_none_or(|s| i.status.state.as_str() == s)
        })
        .filter(|i| q.name.as_deref().is_none_or(|n| i.def.name == n))
        .map(Instance::from)
        .collect();
    listing::respond(items, &q, &headers)
}

/// Creates an instance; with `"start": true` it also starts it.
///
/// Disks listed as `{"create": …}` are made for it (and removed again if it cannot be
/// created). A MAC is generated for a NIC without one.
///
/// A body with `"source": {"snapshot": …}` restores a snapshot instead: the instance's first
/// start continues the guest where the snapshot paused it; with `count`, that many clones.
/// A corrupt snapshot or one from another Kiln version is refused (400, `source.snapshot`)
/// with nothing created.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", operation_id = "instance_create",
    request_body(content = InstanceCreateRequest, description = "The new instance, or instances restored from a snapshot",
        example = json!({"name": "web-1", "vcpus": 1, "memory": "64MiB",
                         "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=wait-powerbutton"}})),
    responses(
        (status = 201, description = "Created (and starting, with `start`); with `count`, the clones", body = CreatedInstances,
            headers(("ETag" = String, description = "The definition's entity tag, for `If-Match`"),
                    ("Location" = String, description = "The new instance's path")),
            links(
                ("get" = (operation_id = "instance_get", parameters(("instance" = "$response.body#/id")), description = "The instance")),
                ("update" = (operation_id = "instance_update", parameters(("instance" = "$response.body#/id")), description = "Change it")),
                ("action" = (operation_id = "instance_action", parameters(("instance" = "$response.body#/id")), description = "Start, stop, …")),
                ("console" = (operation_id = "instance_console", parameters(("instance" = "$response.body#/id")), description = "Its console")),
                ("attach" = (operation_id = "instance_disk_attach", parameters(("instance" = "$response.body#/id")), description = "Attach a disk")),
                ("delete" = (operation_id = "instance_delete", parameters(("instance" = "$response.body#/id")), description = "Delete it")),
            )),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: a disk or image it names went away while it was made", body = ErrorBody),
        (status = 409, description = "`already_exists` (the name, or a new disk's) or `in_use` (a disk attached elsewhere)", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: more vCPUs or memory than the host has, or `too_large`", body = ErrorBody),
    ))]
pub(crate) async fn create(
    Mgr(m): Mgr,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    // Parsed here rather than by InstanceCreateRequest's own Deserialize, so that a refusal
    // names the field (`memory`, `source.snapshot`) as every other body's does.
    let spec: InstanceCreate = if body.get("source").is_some() {
        return crate::snapshots::restore(m, crate::json::from_value(body)?).await;
    } else {
        crate::json::from_value(body)?
    };
    let (inst, _op) = blocking(move || m.create(spec.into())).await?;
    Ok(created(inst))
}

/// One instance, by id or name.
#[utoipa::path(get, path = "/v1/instances/{instance}", tag = "instances", operation_id = "instance_get",
    params(("instance" = String, Path, description = "The instance's id or name")),
    responses(
        (status = 200, description = "The instance", body = Instance,
            headers(("ETag" = String, description = "The definition's entity tag, for `If-Match`"))),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
    ))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Response, ApiError> {
    let inst = m.get(&key)?;
    Ok(tagged(StatusCode::OK, inst))
}

/// Options of `DELETE /v1/instances/{instance}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ForceQuery {
    /// Hard-stop a running instance first (and wait for a start or stop under way).
    #[serde(default)]
    force: bool,
}

/// Deletes a stopped or failed instance (its disks stay).
#[utoipa::path(delete, path = "/v1/instances/{instance}", tag = "instances", operation_id = "instance_delete",
    params(("instance" = String, Path, description = "The instance's id or name"), ForceQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
        (status = 409, description = "`invalid_state`: it runs and `force` is not set", body = ErrorBody),
    ))]
pub(crate) async fn delete(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete(&key, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Options of `POST /v1/instances/{instance}/actions`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Answer when the operation has ended (200 with the instance, or the operation's error)
    /// instead of at once (202 with the operation).
    #[serde(default)]
    wait: bool,
}

/// How long `?wait=true` waits for an action.
const ACTION_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Starts, stops, reboots, resets, pauses or resumes an instance.
///
/// The action runs as an operation. An action that does not fit the instance's state gets
/// 409 `invalid_state`, naming the state.
#[utoipa::path(post, path = "/v1/instances/{instance}/actions", tag = "instances", operation_id = "instance_action",
    params(("instance" = String, Path, description = "The instance's id or name"), WaitQuery),
    request_body(content = ActionRequest, description = "The action",
        example = json!({"action": "start"})),
    responses(
        (status = 202, description = "The action's operation, under way", body = Operation,
            headers(("Location" = String, description = "The operation's path")),
            links(("operation" = (operation_id = "operation_get", parameters(("id" = "$response.body#/id")), description = "The operation")))),
        (status = 200, description = "With `wait=true`: the action succeeded; the instance now", body = Instance),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the action does not fit the state (or, with `wait=true`, the action failed); `in_use`: a disk is being copied or exported", body = ErrorBody),
    ))]
pub(crate) async fn action(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<WaitQuery>,
    ApiJson(a): ApiJson<ActionRequest>,
) -> Result<Response, ApiError> {
    let op = m.action(&key, a.into())?;
    if !q.wait {
        let location = operation_path(op.id);
        let mut r = (StatusCode::ACCEPTED, Json(Operation::from(op))).into_response();
        with_location(&mut r, &location);
        return Ok(r);
    }
    let done = m
        .operations()
        .wait(op.id, ACTION_WAIT)
        .await
        .ok_or_else(|| ApiError::internal("operation vanished"))?;
    match done.error {
        Some(e) => Err(ApiError::invalid_state(e)),
        None => Ok(Json(Instance::from(m.get(&key)?)).into_response()),
    }
}

/// Changes an instance: name, description and `auto_start`; vCPUs, memory and boot settings
/// (kernel, initrd, command line) only while it is stopped. With `If-Match`, only if the definition has not changed since.
#[utoipa::path(patch, path = "/v1/instances/{instance}", tag = "instances", operation_id = "instance_update",
    params(("instance" = String, Path, description = "The instance's id or name")),
    request_body(content = InstancePatch, description = "The fields to change",
        example = json!({"description": "the web server"})),
    responses(
        (status = 200, description = "The instance, changed", body = Instance,
            headers(("ETag" = String, description = "The definition's new entity tag"))),
        (status = 400, description = "`invalid_value` (names the field) or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
        (status = 409, description = "`already_exists` (the new name) or `invalid_state` (vCPUs, memory or boot settings of a running instance)", body = ErrorBody),
        (status = 413, description = "`insufficient_capacity`: more vCPUs or memory than the host has, or `too_large`", body = ErrorBody),
    ))]
pub(crate) async fn patch(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    headers: HeaderMap,
    ApiJson(p): ApiJson<InstancePatch>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers);
    let inst = blocking(move || m.patch(&key, p.into(), expected)).await?;
    Ok(tagged(StatusCode::OK, inst))
}

/// Attaches a disk to a stopped instance.
#[utoipa::path(post, path = "/v1/instances/{instance}/disks", tag = "instances", operation_id = "instance_disk_attach",
    params(("instance" = String, Path, description = "The instance's id or name")),
    request_body(content = AttachRequest, description = "The disk"),
    responses(
        (status = 200, description = "The instance with the disk attached", body = Instance,
            headers(("ETag" = String, description = "The definition's new entity tag"))),
        (status = 400, description = "`invalid_value`: no such disk, or more devices than an instance has room for", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
        (status = 409, description = "`invalid_state` (the instance runs) or `in_use` (the disk is attached elsewhere)", body = ErrorBody),
    ))]
pub(crate) async fn attach(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    ApiJson(a): ApiJson<AttachRequest>,
) -> Result<Response, ApiError> {
    let inst = blocking(move || m.attach_disk(&key, &a.disk, a.read_only)).await?;
    Ok(tagged(StatusCode::OK, inst))
}

/// Detaches a disk from a stopped instance.
#[utoipa::path(delete, path = "/v1/instances/{instance}/disks/{disk}", tag = "instances", operation_id = "instance_disk_detach",
    params(("instance" = String, Path, description = "The instance's id or name"),
           ("disk" = String, Path, description = "The disk's id or name")),
    responses(
        (status = 200, description = "The instance without the disk", body = Instance,
            headers(("ETag" = String, description = "The definition's new entity tag"))),
        (status = 404, description = "`not_found`: no such instance, or the disk is not attached to it", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the instance runs", body = ErrorBody),
    ))]
pub(crate) async fn detach(
    Mgr(m): Mgr,
    Path((key, disk)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let inst = blocking(move || m.detach_disk(&key, &disk)).await?;
    Ok(tagged(StatusCode::OK, inst))
}
