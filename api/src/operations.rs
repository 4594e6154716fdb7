//! Operation routes: the recent operations, one, and waiting for one to end.

use std::time::Duration;

use axum::extract::{Path, Query};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use axum::http::HeaderMap;
use axum::response::Response;

use crate::error::{ApiError, ErrorBody};
use crate::listing::{self, ListQuery};
use crate::plane::Mgr;
use crate::resource::instance_path;
use crate::wire::{Operation, OperationState};

/// Filters of `GET /v1/operations`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct OperationsQuery {
    /// Only operations in this state.
    state: Option<OperationState>,
    /// Only operations on this resource (`/v1/instances/{id}`).
    resource: Option<String>,
    /// Only operations on this instance (its name or id).
    instance: Option<String>,
    /// At most this many operations (1–1000); the next page's token comes in
    /// `x-next-page-token`.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Where the previous page stopped (its `x-next-page-token` header).
    page_token: Option<String>,
}

/// The recent operations (the last 1024), oldest first.
#[utoipa::path(get, path = "/v1/operations", tag = "operations", operation_id = "operation_list",
    params(OperationsQuery),
    responses(
        (status = 200, description = "The operations (a page of them with `limit`)", body = Vec<Operation>,
            headers(("x-next-page-token" = String, description = "The `page_token` of the next page, when there is one"))),
        (status = 400, description = "`bad_request`: a bad query (an unknown parameter or state); `invalid_value`: a bad `limit` or `page_token`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
    ))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<OperationsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let instance = match &q.instance {
        Some(key) => Some(instance_path(m.get(key)?.def.id)),
        None => None,
    };
    let ops: Vec<Operation> = m
        .operations()
        .list()
        .into_iter()
        .map(Operation::from)
        .filter(|o| q.state.is_none_or(|s| o.state == s))
        .filter(|o| q.resource.as_deref().is_none_or(|r| o.resource == r))
        .filter(|o| instance.as_deref().is_none_or(|r| o.resource == r))
        .collect();
    let page = ListQuery {
        limit: q.limit,
        page_token: q.page_token,
        ..ListQuery::default()
    };
    listing::respond(ops, &page, &headers)
}

fn find(m: &control::Manager, id: &str) -> Result<Uuid, ApiError> {
    let not_found = || {
        ApiError::from(control::Error::NotFound {
            kind: control::Kind::Operation,
            key: id.to_string(),
        })
    };
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    m.operations().get(uuid).map(|_| uuid).ok_or_else(not_found)
}

/// One operation.
#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations", operation_id = "operation_get",
    params(("id" = String, Path, description = "The operation's id")),
    responses(
        (status = 200, description = "The operation", body = Operation),
        (status = 404, description = "`not_found`: no such operation (or no longer kept)", body = ErrorBody),
    ))]
pub(crate) async fn get(Mgr(m): Mgr, Path(id): Path<String>) -> Result<Json<Operation>, ApiError> {
    let uuid = find(&m, &id)?;
    let op = m
        .operations()
        .get(uuid)
        .ok_or_else(|| ApiError::internal("operation vanished"))?;
    Ok(Json(op.into()))
}

/// Options of `GET /v1/operations/{id}/wait`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TimeoutQuery {
    /// Seconds to wait at most (30 by default, 3600 at most).
    #[param(maximum = 3600)]
    timeout_s: Option<u64>,
}

/// Waits until the operation has ended, or the timeout has passed.
#[utoipa::path(get, path = "/v1/operations/{id}/wait", tag = "operations", operation_id = "operation_wait",
    params(("id" = String, Path, description = "The operation's id"), TimeoutQuery),
    responses(
        (status = 200, description = "The operation: ended, or still under way when the timeout passed", body = Operation),
        (status = 404, description = "`not_found`: no such operation (or no longer kept)", body = ErrorBody),
    ))]
pub(crate) async fn wait(
    Mgr(m): Mgr,
    Path(id): Path<String>,
    Query(q): Query<TimeoutQuery>,
) -> Result<Json<Operation>, ApiError> {
    let uuid = find(&m, &id)?;
    let timeout = Duration::from_secs(q.timeout_s.unwrap_or(30).min(3600));
    let op = m.operations().wait(uuid, timeout).await.ok_or_else(|| {
        ApiError::from(control::Error::NotFound {
            kind: control::Kind::Operation,
            key: id,
        })
    })?;
    Ok(Json(op.into()))
}
