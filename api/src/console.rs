//! An instance's serial console: the history kept so far (`GET …/console`), and a websocket
//! of its output from now on, which carries the client's bytes to the guest
//! (`GET …/console/stream`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use control::{ConsoleRing, Manager};
use serde::Deserialize;

use crate::error::{ApiError, ErrorBody};
use crate::plane::Mgr;

/// The response header with the offset of the first byte sent.
pub const CONSOLE_OFFSET: &str = "x-console-offset";
/// The response header with the offset just past the last byte sent.
pub const CONSOLE_END: &str = "x-console-end";

/// Which part of the history to send.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsoleQuery {
    /// From this byte offset (clamped to what is kept); 0 by default.
    from: Option<u64>,
    /// Only the last this many bytes (instead of `from`).
    tail: Option<u64>,
    /// When there is nothing from `from` on yet, wait up to this many seconds (60 at most)
    /// for output before answering: a client following the console polls with it.
    #[param(maximum = 60)]
    wait_s: Option<u64>,
}

/// Longest `wait_s` of a console read.
const MAX_CONSOLE_WAIT: u64 = 60;

/// The instance's serial output kept so far (the last MiB), across reboots and restarts.
#[utoipa::path(get, path = "/v1/instances/{instance}/console", tag = "instances", operation_id = "instance_console",
    params(("instance" = String, Path, description = "The instance's id or name"), ConsoleQuery),
    responses(
        (status = 200, description = "The bytes, as text", body = String, content_type = "text/plain",
            headers(("x-console-offset" = u64, description = "Offset of the first byte sent"),
                    ("x-console-end" = u64, description = "Offset just past the last byte sent: the `from` of the next read"))),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
    ))]
pub(crate) async fn history(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let ring = m.console(&key)?;
    if let (Some(from), Some(wait), None) = (q.from, q.wait_s, q.tail) {
        let wait = Duration::from_secs(wait.min(MAX_CONSOLE_WAIT));
        ring.wait_beyond(from, wait).await;
    }
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
    headers.insert(CONSOLE_OFFSET, HeaderValue::from(start));
    headers.insert(CONSOLE_END, HeaderValue::from(end));
    Ok((headers, bytes).into_response())
}

/// A websocket on the instance's serial console: the guest's output from now on to the client
/// (binary messages), the client's messages to the guest's serial input.
#[utoipa::path(get, path = "/v1/instances/{instance}/console/stream", tag = "instances", operation_id = "instance_console_stream",
    params(("instance" = String, Path, description = "The instance's id or name"),
           ("Upgrade" = String, Header, description = "`websocket`"),
           ("Connection" = String, Header, description = "`Upgrade`"),
           ("Sec-WebSocket-Key" = String, Header, description = "The websocket handshake's key"),
           ("Sec-WebSocket-Version" = String, Header, description = "`13`")),
    responses(
        (status = 101, description = "Switching to the websocket protocol",
            headers(("Upgrade" = String, description = "`websocket`"),
                    ("Sec-WebSocket-Accept" = String, description = "The handshake's answer"))),
        (status = 400, description = "`bad_request`: not a websocket handshake", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance", body = ErrorBody),
    ))]
pub(crate) async fn stream(
    Mgr(m): Mgr,
    Path(key): Path<String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let ring = m.console(&key)?;
    Ok(ws.on_upgrade(move |socket| relay(m, key, ring, socket)))
}

/// Copies new console output to the websocket and the client's bytes to the serial port.
async fn relay(
    m: Arc<Manager>,
    key: String,
    ring: ConsoleRing,
    socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    let (mut tx, mut rx) = socket.split();
    let output = tokio::spawn(async move {
        // Live output from now on; the history is GET …/console.
        let mut offset = ring.bounds().1;
        loop {
            if ring.wait_beyond(offset, Duration::from_secs(30)).await <= offset {
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
        // The pipe into the serial port is non-blocking: this never waits for the guest.
        if m.console_input(&key, &bytes).is_err() {
            break;
        }
    }
    output.abort();
}
