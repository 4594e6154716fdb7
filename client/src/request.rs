//! The raw layer: a request of any method, path, headers and body, answered as it came. The
//! typed calls are built on it; tests of the HTTP contract use it directly.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::body::{self, Body};
use crate::connection::Client;
use crate::error::Error;

/// A request being built: see [`Client::request`].
pub struct RequestBuilder {
    client: Client,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Client {
    /// A request of `method` on `path` (with its query), with no body yet.
    pub fn request(&self, method: Method, path: impl Into<String>) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method,
            path: path.into(),
            headers: Vec::new(),
            body: body::empty(),
        }
    }

    /// Writes `request` (a whole HTTP/1 request, possibly malformed) on a new connection as
    /// it is, ignoring a server that stops reading early, and returns what the server wrote
    /// back until it closed the connection (at most 10 s). For tests of what the server does
    /// with requests no client would send.
    pub async fn exchange_raw(&self, request: &[u8]) -> Result<Vec<u8>, Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut io = self.connect().await?;
        let _ = io.write_all(request).await;
        let _ = io.shutdown().await;
        let mut out = Vec::new();
        let read = io.read_to_end(&mut out);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
        Ok(out)
    }
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A JSON body (`Content-Type: application/json`).
    pub fn json(self, value: &impl Serialize) -> Self {
        let text = serde_json::to_vec(value).unwrap_or_default();
        self.body("application/json", body::bytes(text))
    }

    /// A body with its content type.
    pub fn body(self, content_type: &str, body: Body) -> Self {
        self.header(CONTENT_TYPE.as_str(), content_type)
            .raw_body(body)
    }

    /// A body, with no content type of its own.
    pub fn raw_body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    fn build(self) -> Result<(Client, hyper::Request<Body>), Error> {
        let mut req = hyper::Request::builder()
            .method(self.method)
            .uri(&self.path)
            .header(HOST, self.client.host());
        if let Some(auth) = self.client.authorization() {
            req = req.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| Error::Transport(format!("header {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| Error::Transport(format!("header {name}: {e}")))?;
            req = req.header(name, value);
        }
        let req = req
            .body(self.body)
            .map_err(|e| Error::Transport(format!("request {}: {e}", self.path)))?;
        Ok((self.client, req))
    }

    /// Sends the request; answers the connection (to keep once the body is read) and the
    /// answer's head and body.
    async fn exchange(
        self,
    ) -> Result<
        (
            Client,
            SendRequest<Body>,
            hyper::http::response::Parts,
            Incoming,
        ),
        Error,
    > {
        let (client, req) = self.build()?;
        let mut tx = client.sender().await?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| Error::Transport(format!("request failed: {e}")))?;
        let (parts, body) = resp.into_parts();
        Ok((client, tx, parts, body))
    }

    /// Sends the request and reads the whole answer, whatever its status.
    pub async fn send(self) -> Result<Reply, Error> {
        let (client, tx, parts, body) = self.exchange().await?;
        let reply = Streamed {
            status: parts.status,
            headers: parts.headers,
            body,
        }
        .into_reply()
        .await?;
        client.keep(tx);
        Ok(reply)
    }

    /// Sends the request and returns the answer's head; its body comes as it is read. An
    /// answer that is not a success is read whole and returned as the error.
    pub async fn stream(self) -> Result<Streamed, Error> {
        let (_, _, parts, body) = self.exchange().await?;
        let streamed = Streamed {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        if streamed.status.is_success() {
            Ok(streamed)
        } else {
            Err(streamed.into_reply().await?.error())
        }
    }
}

/// An answer read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::Decode(format!(
                "{e}: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            ))
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error this answer is, when it is not a success.
    pub fn error(&self) -> Error {
        Error::from_answer(self.status, &self.body)
    }

    /// The answer when it is a success, else its error.
    pub fn success(self) -> Result<Reply, Error> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.error())
        }
    }
}

/// An answer whose body is read as it comes.
pub struct Streamed {
    /// The HTTP status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    body: Incoming,
}

impl Streamed {
    /// The next chunk of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, Error>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(Error::Transport(format!("the answer broke off: {e}")))),
            }
        }
    }

    /// The `Content-Length` of the body, when the server gave one.
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// Reads the rest of the body.
    pub async fn into_reply(self) -> Result<Reply, Error> {
        let body = self
            .body
            .collect()
            .await
            .map_err(|e| Error::Transport(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(Reply {
            status: self.status,
            headers: self.headers,
            body,
        })
    }
}
