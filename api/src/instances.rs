//! Instance, action, console and operation routes: each maps onto one `vmm::Manager` call.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use control::{Action, InstanceCreate, InstancePatch, Manager};
use serde::Deserialize;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::listing::{self, ListQuery};
use crate::router::AppState;

/// The manager, taken from the state (absent only in HTTP-only test servers).
pub(crate) struct Mgr(pub(crate) Arc<Manager>);

impl axum::extract::FromRequestParts<AppState> for Mgr {
    type Rejection = ApiError;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state
            .manager
            .0
            .clone()
            .map(Mgr)
            .ok_or_else(|| ApiError::internal("this server has no instance manager"))
    }
}

/// Runs a blocking manager call off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?
}

#[utoipa::path(get, path = "/v1/instances", tag = "instances", params(ListQuery),
    responses((status = 200, description = "The instances (a page of them with `limit`; the next page's token in `x-next-page-token`)")))]
pub(crate) async fn list(
    Mgr(m): Mgr,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let items: Vec<_> = m
        .list()
        .into_iter()
        .filter(|i| q.state.as_deref().is_none_or(|s| i.state.to_string() == s))
        .filter(|i| q.name.as_deref().is_none_or(|n| i.def.name == n))
        .collect();
    listing::respond(items, &q, &headers)
}

#[utoipa::path(post, path = "/v1/instances", tag = "instances",
    request_body(content = Object, description = "The instance (API.md), plus `start`"),
    responses((status = 201, description = "Created"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(crate) async fn create(
    Mgr(m): Mgr,
    ApiJson(spec): ApiJson<InstanceCreate>,
) -> Result<Response, ApiError> {
    let (inst, _op) = blocking(move || m.create(spec).map_err(ApiError::from)).await?;
    let mut r = with_etag(StatusCode::CREATED, &inst, &inst.etag());
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/v1/instances/{}", inst.def.id))
            .map_err(ApiError::internal)?,
    );
    Ok(r)
}

#[utoipa::path(get, path = "/v1/instances/{instance}", tag = "instances", params(("instance" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The instance, with an ETag"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(Mgr(m): Mgr, Path(key): Path<String>) -> Result<Response, ApiError> {
    let inst = m.get(&key)?;
    Ok(with_etag(StatusCode::OK, &inst, &inst.etag()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ForceQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/instances/{instance}", tag = "instances", params(("instance" = String, Path, description = "Id or name"), ForceQuery),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn delete(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Result<StatusCode, ApiError> {
    blocking(move || m.delete(&key, q.force).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    #[serde(default)]
    wait: bool,
}

#[utoipa::path(post, path = "/v1/instances/{instance}/actions", tag = "instances", params(("instance" = String, Path, description = "Id or name"), WaitQuery),
    request_body(content = Object, description = "{\"action\": start|stop|reboot|reset|pause|resume, \"force\", \"timeout_s\"}"),
    responses((status = 202, description = "The operation"), (status = 200, description = "With wait=true: the instance"), (status = 409, body = ErrorBody)))]
pub(crate) async fn action(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<WaitQuery>,
    ApiJson(a): ApiJson<Action>,
) -> Result<Response, ApiError> {
    let op = m.action(&key, a)?;
    if !q.wait {
        let mut r = (StatusCode::ACCEPTED, Json(&op)).into_response();
        let loc = format!("/v1/operations/{}", op.id);
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(&loc).unwrap());
        return Ok(r);
    }
    let m2 = m.clone();
    let done = blocking(move || {
        m2.operations
            .wait(op.id, Duration::from_secs(600))
            .ok_or_else(|| ApiError::internal("operation vanished"))
    })
    .await?;
    match done.error {
        Some(e) => Err(ApiError::invalid_state(e)),
        None => Ok(Json(m.get(&key)?).into_response()),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsoleQuery {
    from: Option<u64>,
    tail: Option<u64>,
}

#[utoipa::path(get, path = "/v1/instances/{instance}/console", tag = "instances", params(("instance" = String, Path, description = "Id or name"), ConsoleQuery),
    responses((status = 200, description = "Serial output kept so far (x-console-offset, x-console-end)", content_type = "text/plain")))]
pub(crate) async fn console(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let ring = m.console(&key)?;
    let (start, bytes) = match (q.from, q.tail) {
        (_, Some(t)) => ring.tail(t),
        (f, None) => ring.read_from(f.unwrap_or(0)),
    };
    let end = start + bytes.len() as u64;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-console-offset", HeaderValue::from(start));
    headers.insert("x-console-end", HeaderValue::from(end));
    Ok((headers, bytes).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct OperationsQuery {
    /// Only operations in this state.
    state: Option<String>,
    /// Only operations on this resource (`/v1/instances/{id}`).
    resource: Option<String>,
}

#[utoipa::path(get, path = "/v1/operations", tag = "operations", params(OperationsQuery),
    responses((status = 200, description = "Recent operations")))]
pub(crate) async fn operations(Mgr(m): Mgr, Query(q): Query<OperationsQuery>) -> Response {
    let ops: Vec<_> = m
        .operations
        .list()
        .into_iter()
        .filter(|o| {
            q.state.as_deref().is_none_or(|s| {
                serde_json::to_value(o.state)
                    .ok()
                    .and_then(|v| v.as_str().map(|x| x == s))
                    == Some(true)
            })
        })
        .filter(|o| q.resource.as_deref().is_none_or(|r| o.resource == r))
        .collect();
    Json(ops).into_response()
}

fn op_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("operation {id} not found")))
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations", params(("id" = String, Path, description = "Operation id")),
    responses((status = 200, description = "The operation"), (status = 404, body = ErrorBody)))]
pub(crate) async fn operation(Mgr(m): Mgr, Path(id): Path<String>) -> Result<Response, ApiError> {
    let op = m
        .operations
        .get(op_id(&id)?)
        .ok_or_else(|| ApiError::not_found(format!("operation {id} not found")))?;
    Ok(Json(op).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TimeoutQuery {
    timeout_s: Option<u64>,
}

#[utoipa::path(get, path = "/v1/operations/{id}/wait", tag = "operations", params(("id" = String, Path, description = "Operation id"), TimeoutQuery),
    responses((status = 200, description = "The operation once it ended, or the timeout passed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn wait_operation(
    Mgr(m): Mgr,
    Path(id): Path<String>,
    Query(q): Query<TimeoutQuery>,
) -> Result<Response, ApiError> {
    let uuid = op_id(&id)?;
    let timeout = Duration::from_secs(q.timeout_s.unwrap_or(30).min(3600));
    let op = blocking(move || {
        m.operations
            .wait(uuid, timeout)
            .ok_or_else(|| ApiError::not_found(format!("operation {id} not found")))
    })
    .await?;
    Ok(Json(op).into_response())
}

#[utoipa::path(get, path = "/v1/instances/{instance}/console/stream", tag = "instances",
    params(("instance" = String, Path, description = "Id or name")),
    responses((status = 101, description = "Websocket: guest output to the client (binary), client bytes to the guest"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn console_stream(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let ring = m.console(&key)?;
    Ok(ws.on_upgrade(move |socket| stream_console(m, key, ring, socket)))
}

/// Copies new console output to the websocket and the client's bytes to the serial port.
async fn stream_console(
    m: Arc<Manager>,
    key: String,
    ring: control::ConsoleRing,
    socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    let (mut tx, mut rx) = socket.split();
    let output = tokio::spawn(async move {
        // Live output from now on; the history is GET …/console.
        let mut offset = ring.bounds().1;
        loop {
            let (r, off) = (ring.clone(), offset);
            let Ok(end) =
                tokio::task::spawn_blocking(move || r.wait_beyond(off, Duration::from_millis(500)))
                    .await
            else {
                break;
            };
            if end <= offset {
                continue;
            }
            let (start, bytes) = ring.read_from(offset);
            offset = start + bytes.len() as u64;
            if tx.send(Message::Binary(bytes.into())).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = rx.next().await {
        let bytes: Vec<u8> = match msg {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        let (m, key) = (m.clone(), key.clone());
        let r = tokio::task::spawn_blocking(move || m.console_input(&key, &bytes)).await;
        if !matches!(r, Ok(Ok(()))) {
            break;
        }
    }
    output.abort();
}

/// The `If-Match` header, if any.
pub(crate) fn if_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// A JSON response with the resource's `ETag`.
pub(crate) fn with_etag(status: StatusCode, body: &impl serde::Serialize, etag: &str) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

#[utoipa::path(patch, path = "/v1/instances/{instance}", tag = "instances",
    params(("instance" = String, Path, description = "Id or name"), ("If-Match" = Option<String>, Header, description = "ETag from GET")),
    request_body(content = Object, description = "{name, description, auto_start; vcpus and memory only while stopped}"),
    responses((status = 200, description = "The instance"), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub(crate) async fn patch(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    headers: HeaderMap,
    ApiJson(p): ApiJson<InstancePatch>,
) -> Result<Response, ApiError> {
    let tag = if_match(&headers);
    let inst = blocking(move || m.patch(&key, p, tag.as_deref()).map_err(ApiError::from)).await?;
    Ok(with_etag(StatusCode::OK, &inst, &inst.etag()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Attach {
    disk: String,
    #[serde(default)]
    read_only: bool,
}

#[utoipa::path(post, path = "/v1/instances/{instance}/disks", tag = "instances",
    params(("instance" = String, Path, description = "Id or name")),
    request_body(content = Object, description = "{\"disk\": name or id, \"read_only\": false}"),
    responses((status = 200, description = "The instance with the disk attached"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn attach(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    ApiJson(a): ApiJson<Attach>,
) -> Result<Response, ApiError> {
    let inst = blocking(move || {
        m.attach_disk(&key, &a.disk, a.read_only)
            .map_err(ApiError::from)
    })
    .await?;
    Ok(with_etag(StatusCode::OK, &inst, &inst.etag()))
}

#[utoipa::path(delete, path = "/v1/instances/{instance}/disks/{disk}", tag = "instances",
    params(("instance" = String, Path, description = "Id or name"), ("disk" = String, Path, description = "Disk id or name")),
    responses((status = 200, description = "The instance without the disk"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn detach(
    Mgr(m): Mgr,
    Path((key, disk)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let inst = blocking(move || m.detach_disk(&key, &disk).map_err(ApiError::from)).await?;
    Ok(with_etag(StatusCode::OK, &inst, &inst.etag()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events after this sequence number (default: from now on).
    since: Option<u64>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, description = "Server-sent events: one `data:` JSON event per state change or operation update, `id:` its sequence number", content_type = "text/event-stream")))]
pub(crate) async fn events(
    Mgr(m): Mgr,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    // A reconnecting client says where it stopped in Last-Event-ID.
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let start = q.since.or(last).unwrap_or_else(|| m.events.last_seq());
    let stream = futures_util::stream::unfold((m, start), |(m, seq)| async move {
        loop {
            let m2 = m.clone();
            let batch =
                tokio::task::spawn_blocking(move || m2.events.since(seq, Duration::from_secs(10)))
                    .await
                    .ok()?;
            if let Some(last) = batch.last().map(|e| e.seq) {
                let items: Vec<Result<SseEvent, std::convert::Infallible>> = batch
                    .iter()
                    .map(|e| {
                        Ok(SseEvent::default()
                            .id(e.seq.to_string())
                            .event(e.kind.clone())
                            .json_data(e)
                            .unwrap_or_default())
                    })
                    .collect();
                return Some((futures_util::stream::iter(items), (m, last)));
            }
        }
    });
    use futures_util::StreamExt;
    Sse::new(stream.flatten())
        .keep_alive(KeepAlive::default())
        .into_response()
}
