//! Where the server is, and the connections to it: HTTP/1 over its Unix socket or TCP (with
//! the bearer token), kept open between requests and reused.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::error::Error;

/// A byte stream to the server: Unix socket or TCP.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Where `kiln serve` listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its TCP listener (`HOST:PORT`).
    Tcp {
        /// `HOST:PORT`.
        addr: String,
        /// The bearer token every request carries (the server refuses requests without it;
        /// `None` is for tests of that refusal).
        token: Option<String>,
    },
}

impl Endpoint {
    /// The TCP endpoint of a URL (`http://HOST:PORT`, or `HOST:PORT`).
    pub fn tcp(url: &str, token: &str) -> Self {
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Endpoint::Tcp {
            addr,
            token: Some(token.to_string()),
        }
    }

    fn shown(&self) -> String {
        match self {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { addr, .. } => addr.clone(),
        }
    }
}

struct Inner {
    endpoint: Endpoint,
    /// `Authorization: Bearer …`, for TCP.
    authorization: Option<HeaderValue>,
    /// Connections whose last exchange is over, to be reused.
    idle: Mutex<Vec<SendRequest<Body>>>,
}

/// A client of one server. Cheap to clone: clones share the connections kept open.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.0.endpoint.shown())
    }
}

impl Client {
    /// A client of the server at `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        let authorization = match &endpoint {
            Endpoint::Tcp {
                token: Some(token), ..
            } => HeaderValue::from_str(&format!("Bearer {token}")).ok(),
            _ => None,
        };
        Client(Arc::new(Inner {
            endpoint,
            authorization,
            idle: Mutex::default(),
        }))
    }

    /// A client of the server on the Unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    /// Where the server is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }

    /// The `Authorization` header every request carries (TCP only).
    pub(crate) fn authorization(&self) -> Option<&HeaderValue> {
        self.0.authorization.as_ref()
    }

    /// The `Host` header of requests.
    pub(crate) fn host(&self) -> &str {
        match &self.0.endpoint {
            Endpoint::Unix(_) => "kiln",
            Endpoint::Tcp { addr, .. } => addr,
        }
    }

    /// A new byte stream to the server.
    pub async fn connect(&self) -> Result<Box<dyn Io>, Error> {
        let target = self.0.endpoint.shown();
        let failed = |source| Error::Connect {
            target: target.clone(),
            source,
        };
        Ok(match &self.0.endpoint {
            Endpoint::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?,
            ),
            Endpoint::Tcp { addr, .. } => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(failed)?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
        })
    }

    /// A connection ready for a request: a kept one, or a new one.
    pub(crate) async fn sender(&self) -> Result<SendRequest<Body>, Error> {
        loop {
            let kept = self
                .0
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(mut tx) = kept else { break };
            if tx.ready().await.is_ok() {
                return Ok(tx);
            }
        }
        let io = TokioIo::new(self.connect().await?);
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Error::Transport(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(tx)
    }

    /// Keeps a connection whose exchange is over for the next request.
    pub(crate) fn keep(&self, tx: SendRequest<Body>) {
        if !tx.is_closed() {
            self.0
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(tx);
        }
    }
}
