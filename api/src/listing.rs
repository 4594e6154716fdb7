//! Lists: the query options every list route shares (API.md) — `limit` and `page_token`
//! (the next page's token comes in the `x-next-page-token` header), `fields=a,b` to keep only
//! some fields, and `ndjson` (or `Accept: application/x-ndjson`) for one JSON object per line.

use std::borrow::Cow;

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use utoipa::openapi::schema::Schema;
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::error::ApiError;

/// Declares the schema of an item of a list: the item's, with every property optional
/// (`fields` keeps only some; without it, every one is there).
macro_rules! listed {
    ($(#[$meta:meta])* $listed:ident = $item:ty) => {
        $(#[$meta])*
        pub(crate) struct $listed;

        impl PartialSchema for $listed {
            fn schema() -> RefOr<Schema> {
                let mut schema = <$item as PartialSchema>::schema();
                if let RefOr::T(Schema::Object(o)) = &mut schema {
                    o.required.clear();
                    o.description = Some(format!(
                        "{}: every field, or those `fields` names",
                        <$item as ToSchema>::name()
                    ));
                }
                schema
            }
        }

        impl ToSchema for $listed {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($listed))
            }
        }
    };
}

listed!(
    /// An instance in a list.
    ListedInstance = crate::wire::Instance
);
listed!(
    /// A disk in a list.
    ListedDisk = crate::wire::Disk
);
listed!(
    /// An image in a list.
    ListedImage = crate::wire::Image
);

/// Largest page a client may ask for.
const MAX_LIMIT: usize = 1000;

/// The query options of a list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only items in this state (instances: `running`, …; disks: `attached` or `detached`).
    pub state: Option<String>,
    /// Only the item with this name.
    pub name: Option<String>,
    /// At most this many items (1–1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Where the previous page stopped (its `x-next-page-token` header).
    pub page_token: Option<String>,
    /// Comma-separated fields to keep (`id,name,state`).
    pub fields: Option<String>,
    /// One JSON object per line instead of an array.
    #[serde(default)]
    pub ndjson: bool,
}

impl ListQuery {
    /// Refuses a `state` that is not one of `states` (400 `invalid_value` naming them).
    pub(crate) fn check_state(&self, states: &[&str]) -> Result<(), ApiError> {
        match &self.state {
            Some(s) if !states.contains(&s.as_str()) => Err(ApiError::invalid_value(
                "state",
                if states.is_empty() {
                    format!("unknown state `{s}`: these items have no state")
                } else {
                    format!("unknown state `{s}`; one of: {}", states.join(", "))
                },
            )),
            _ => Ok(()),
        }
    }
}

/// The fields of an item of a list (its schema's properties).
fn fields_of<T: PartialSchema>() -> Vec<String> {
    match T::schema() {
        RefOr::T(Schema::Object(o)) => o.properties.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Answers a list: pages it by id, projects fields and picks the output format. A field of
/// `fields` that items do not have is refused (400 `invalid_value` naming it).
pub(crate) fn respond<T: Serialize + PartialSchema>(
    items: Vec<T>,
    q: &ListQuery,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let mut values: Vec<Value> = items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(ApiError::internal)?;
    if let Some(token) = &q.page_token {
        let at = values
            .iter()
            .position(|v| v["id"].as_str() == Some(token))
            .ok_or_else(|| {
                ApiError::invalid_value("page_token", "unknown token; start again without it")
            })?;
        values.drain(..=at);
    }
    let mut next = None;
    if let Some(limit) = q.limit {
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid_value(
                "limit",
                format!("must be 1 to {MAX_LIMIT}"),
            ));
        }
        if values.len() > limit {
            values.truncate(limit);
            next = values
                .last()
                .and_then(|v| v["id"].as_str().map(String::from));
        }
    }
    if let Some(fields) = &q.fields {
        let keep: Vec<&str> = fields.split(',').map(str::trim).collect();
        let known = fields_of::<T>();
        if let Some(bad) = keep.iter().find(|f| !known.iter().any(|k| k == *f)) {
            return Err(ApiError::invalid_value(
                "fields",
                format!("unknown field `{bad}`; items have: {}", known.join(", ")),
            ));
        }
        for v in &mut values {
            if let Value::Object(m) = v {
                m.retain(|k, _| keep.contains(&k.as_str()));
            }
        }
    }
    let ndjson = q.ndjson
        || headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("application/x-ndjson"));
    let mut r = if ndjson {
        let mut body = String::new();
        for v in &values {
            body.push_str(&v.to_string());
            body.push('\n');
        }
        ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
    } else {
        Json(values).into_response()
    };
    if let Some(n) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        r.headers_mut().insert("x-next-page-token", n);
    }
    Ok(r)
}
