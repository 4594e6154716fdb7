//! `GET /v1/events`: server-sent events of every state change and operation update.

use std::time::Duration;

use axum::extract::Query;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::error::ErrorBody;
use crate::plane::Mgr;
use crate::wire::Event;

/// Where the stream starts.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events after this sequence number (default: from now on, or after
    /// `Last-Event-ID`).
    since: Option<u64>,
    /// `false`: send the events kept after `since`, then end the stream (default `true`:
    /// the stream goes on with new events).
    follow: Option<bool>,
}

/// State changes and operation updates as server-sent events.
///
/// Each event is one `data:` line of JSON (an `Event`), with `id:` its sequence number and
/// `event:` its kind. A reconnecting client resumes with `Last-Event-ID` or `since`.
#[utoipa::path(get, path = "/v1/events", tag = "events", operation_id = "event_stream",
    params(EventsQuery,
           ("Last-Event-ID" = Option<String>, Header, description = "The `id:` of the last event seen: the stream resumes after it")),
    responses(
        (status = 200, description = "A stream of server-sent events (never ends by itself)", body = String, content_type = "text/event-stream"),
        (status = 400, description = "`bad_request`: a bad query", body = ErrorBody),
    ))]
pub(crate) async fn stream(
    Mgr(m): Mgr,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let start = q.since.or(last).unwrap_or_else(|| m.events().last_seq());
    if q.follow == Some(false) {
        let kept: Vec<Result<SseEvent, std::convert::Infallible>> = m
            .events()
            .since(start)
            .into_iter()
            .map(|e| Ok(sse(e)))
            .collect();
        return Sse::new(futures_util::stream::iter(kept)).into_response();
    }
    let stream = futures_util::stream::unfold((m, start), |(m, seq)| async move {
        loop {
            let batch = m.events().wait_since(seq, Duration::from_secs(30)).await;
            if let Some(last) = batch.last().map(|e| e.seq) {
                let items: Vec<Result<SseEvent, std::convert::Infallible>> =
                    batch.into_iter().map(|e| Ok(sse(e))).collect();
                return Some((futures_util::stream::iter(items), (m, last)));
            }
        }
    });
    Sse::new(stream.flatten())
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One event as a server-sent event.
fn sse(e: control::Event) -> SseEvent {
    let e = Event::from(e);
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .json_data(&e)
        .unwrap_or_default()
}
