//! [`ApiJson`]: the JSON body extractor and response of the API, whose rejections are
//! [`ApiError`]s: 415 for a `Content-Type` that is clearly not JSON, 413 for a body over the
//! limit, 400 `bad_request` for malformed JSON and 400 `invalid_value` naming the field for
//! unknown fields, missing fields and wrong types.
//!
//! A body without a `Content-Type`, or with curl's default for `-d`
//! (`application/x-www-form-urlencoded`), is parsed as JSON: users paste `curl -d '{…}'`
//! commands, and other VMMs' APIs take them too. Every other type that is not JSON
//! (`text/plain`, `multipart/form-data`, …) is refused with 415.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::error::Category;

use crate::error::ApiError;

/// The body size limit of JSON routes, in bytes (1 MiB). Streaming routes opt out.
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

/// A JSON request body (as an extractor) or response body (as a return value).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        check_content_type(req.headers())?;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(format!(
                    "request body is larger than the limit of {JSON_BODY_LIMIT} bytes"
                )),
                _ => ApiError::bad_request(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                )),
            }
        })?;
        from_slice(&bytes).map(ApiJson)
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Parses a JSON document into `T`, with the errors [`ApiJson`] gives.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Reads a JSON value already parsed into `T`, with the errors [`ApiJson`] gives (the field's
/// path named), for bodies whose type depends on their content.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

fn path_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("malformed JSON: {inner}"))
        }
        Category::Data if path == "." || path.is_empty() => ApiError::new(
            crate::ErrorCode::InvalidValue,
            format!("invalid request body: {inner}"),
        ),
        Category::Data => ApiError::invalid_value(&path, inner),
    }
}

/// The `Content-Type` that curl's `-d` sends when none is given.
const CURL_DEFAULT: &str = "application/x-www-form-urlencoded";

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let wrong = || {
        ApiError::unsupported_media_type(
            "expected a JSON body with `Content-Type: application/json`",
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let value = value.to_str().map_err(|_| wrong())?;
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(CURL_DEFAULT) {
        return Ok(());
    }
    let (kind, subtype) = essence.split_once('/').ok_or_else(wrong)?;
    let json = kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.to_ascii_lowercase().ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(wrong())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use axum::body::Body;
    use axum::extract::DefaultBodyLimit;
    use axum::routing::post;
    use axum::Router;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: String,
        vcpus: u32,
        #[serde(default)]
        boot: Option<Boot>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Boot {
        kernel: String,
    }

    fn parse(body: &str) -> Result<Create, ApiError> {
        from_slice(body.as_bytes())
    }

    #[test]
    fn a_good_body_parses() {
        let c = parse(r#"{"name": "a", "vcpus": 2, "boot": {"kernel": "k"}}"#).unwrap();
        assert_eq!(c.vcpus, 2);
    }

    #[test]
    fn malformed_json_is_bad_request() {
        let err = parse(r#"{"name": "a", "vcpus": "#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
        assert!(
            err.message().contains("malformed JSON"),
            "{}",
            err.message()
        );
        let err = parse(r#"{"name": "a", "vcpus": 1} trailing"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(r#"{"name": "a", "vcpus": 1, "colour": "red"}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidValue);
        assert!(err.message().contains("`colour`"), "{}", err.message());
        let err =
            parse(r#"{"name": "a", "vcpus": 1, "boot": {"kernel": "k", "x": 1}}"#).unwrap_err();
        assert!(err.message().contains("`boot.x`"), "{}", err.message());
    }

    #[test]
    fn wrong_type_and_range_name_the_field() {
        let err = parse(r#"{"name": "a", "vcpus": "two"}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidValue);
        assert!(err.message().contains("`vcpus`"), "{}", err.message());
        let err = parse(r#"{"name": "a", "vcpus": -1}"#).unwrap_err();
        assert!(err.message().contains("`vcpus`"), "{}", err.message());
        let err = parse(r#"{"name": "a", "vcpus": 1, "boot": {"kernel": 5}}"#).unwrap_err();
        assert!(err.message().contains("`boot.kernel`"), "{}", err.message());
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(r#"{"vcpus": 1}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidValue);
        assert!(err.message().contains("`name`"), "{}", err.message());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_ok(), "no Content-Type: JSON");
        for ok in [
            "application/x-www-form-urlencoded",
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            h.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(check_content_type(&h).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "json",
        ] {
            h.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            let err = check_content_type(&h).unwrap_err();
            assert_eq!(err.code(), ErrorCode::UnsupportedMediaType, "{bad}");
        }
    }

    async fn echo(ApiJson(c): ApiJson<Create>) -> ApiJson<Create> {
        ApiJson(c)
    }

    async fn send(content_type: Option<&str>, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let app = Router::new()
            .route("/echo", post(echo))
            .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT));
        let mut req = Request::post("/echo");
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let response = app
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn extractor_round_trip_and_rejections() {
        let (status, json) = send(
            Some("application/json"),
            br#"{"name":"a","vcpus":1}"#.to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["vcpus"], 1);

        let (status, json) = send(Some("text/plain"), b"{}".to_vec()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(json["error"]["code"], "unsupported_media_type");

        // What `curl -d` sends: no Content-Type, or its form default; both are JSON here.
        for ct in [None, Some("application/x-www-form-urlencoded")] {
            let (status, json) = send(ct, br#"{"name":"a","vcpus":1}"#.to_vec()).await;
            assert_eq!(status, StatusCode::OK, "{ct:?}: {json}");
            assert_eq!(json["vcpus"], 1);
        }
        // A form body under curl's default type is still malformed JSON.
        let (status, json) = send(Some("application/x-www-form-urlencoded"), b"a=1".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"]["code"], "bad_request");

        let mut big = br#"{"name":""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', JSON_BODY_LIMIT + 1));
        big.extend(br#"","vcpus":1}"#);
        let (status, json) = send(Some("application/json"), big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json["error"]["code"], "too_large");

        let (status, json) = send(
            Some("application/json"),
            br#"{"name":"a","vcpus":1,"extra":true}"#.to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"]["code"], "invalid_value");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`extra`"));
    }
}
