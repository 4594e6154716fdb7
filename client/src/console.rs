//! An instance's serial console: the history kept (`GET …/console`) and the websocket
//! (`GET …/console/stream`).

use api::console::{CONSOLE_END, CONSOLE_OFFSET};
use hyper::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use crate::calls::escape;
use crate::connection::{Client, Io};
use crate::error::Error;

/// Console history: bytes and where they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// Offset of the first byte.
    pub offset: u64,
    /// Offset just past the last byte: where the next read starts.
    pub end: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The console websocket: binary messages of guest output; what is sent goes to the guest.
pub type ConsoleSocket = WebSocketStream<Box<dyn Io>>;

impl Client {
    /// The console history of an instance from byte `from`, or its last `tail` bytes.
    pub async fn instance_console(
        &self,
        key: &str,
        from: Option<u64>,
        tail: Option<u64>,
    ) -> Result<ConsoleChunk, Error> {
        let mut path = format!("/v1/instances/{}/console", escape(key));
        let query: Vec<String> = [("from", from), ("tail", tail)]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
            .collect();
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let reply = self.request(Method::GET, path).send().await?.success()?;
        chunk(&reply)
    }

    /// The console history of an instance from byte `from`; when there is nothing from there
    /// on yet, the server waits up to `wait_s` seconds for output.
    pub async fn instance_console_wait(
        &self,
        key: &str,
        from: u64,
        wait_s: u64,
    ) -> Result<ConsoleChunk, Error> {
        let path = format!(
            "/v1/instances/{}/console?from={from}&wait_s={wait_s}",
            escape(key)
        );
        let reply = self.request(Method::GET, path).send().await?.success()?;
        chunk(&reply)
    }

    /// Opens the console websocket of an instance.
    pub async fn instance_console_stream(&self, key: &str) -> Result<ConsoleSocket, Error> {
        let path = format!("/v1/instances/{}/console/stream", escape(key));
        let mut req = format!("ws://{}{path}", self.host())
            .into_client_request()
            .map_err(|e| Error::Transport(format!("console request: {e}")))?;
        if let Some(auth) = self.authorization() {
            req.headers_mut()
                .insert(hyper::header::AUTHORIZATION, auth.clone());
        }
        let io = self.connect().await?;
        match tokio_tungstenite::client_async(req, io).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                Err(Error::from_answer(resp.status(), &body))
            }
            Err(e) => Err(Error::Transport(format!("console connection: {e}"))),
        }
    }
}

/// The console history in a reply.
fn chunk(reply: &crate::Reply) -> Result<ConsoleChunk, Error> {
    let number = |h: &str| {
        reply
            .header(h)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Decode(format!("no {h} header")))
    };
    Ok(ConsoleChunk {
        offset: number(CONSOLE_OFFSET)?,
        end: number(CONSOLE_END)?,
        bytes: reply.body.to_vec(),
    })
}
