//! The accept loop of every listener, bounded: at most [`Limits::max_connections`] connections
//! at once per listener (past that, new ones wait in the kernel's backlog and cost the daemon
//! no fd), request headers read within [`Limits::header_timeout`], a request body that sends
//! nothing for [`Limits::body_idle_timeout`] cut off. Each listener has its own limit, so no
//! number of TCP clients keeps the Unix socket (the operator's way in) from answering.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and, with TLS, to finish the
    /// handshake); a connection idle between requests for this long is closed too.
    pub header_timeout: Duration,
    /// Time a request body may send nothing before the request fails.
    pub body_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A byte stream of one connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection once accepted, boxed (plain or TLS).
pub type BoxedIo = Pin<Box<dyn Io>>;

/// What turns an accepted stream into the bytes HTTP runs on (a TLS handshake, or nothing).
pub type Wrap =
    Arc<dyn Fn(BoxedIo) -> Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send>> + Send + Sync>;

/// A listening socket.
pub trait Accept: Send + 'static {
    /// Waits for the next connection.
    fn next(&self) -> impl Future<Output = io::Result<BoxedIo>> + Send;
}

impl Accept for tokio::net::TcpListener {
    async fn next(&self) -> io::Result<BoxedIo> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(Box::pin(s))
    }
}

impl Accept for tokio::net::UnixListener {
    async fn next(&self) -> io::Result<BoxedIo> {
        let (s, _) = self.accept().await?;
        Ok(Box::pin(s))
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets the
/// connections in flight finish their requests (the caller bounds how long it waits).
pub(crate) async fn serve(
    listener: impl Accept,
    router: Router,
    limits: Limits,
    wrap: Option<Wrap>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = router.layer(RequestBodyTimeoutLayer::new(limits.body_idle_timeout));
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    // Tells every connection to finish the request in flight and close.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            s = listener.next() => s,
            () = &mut shutdown => break,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of fds (or memory): wait a little instead of spinning on accept.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        let wrap = wrap.clone();
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match wrap {
                None => stream,
                Some(w) => match tokio::time::timeout(limits.header_timeout, w(stream)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!("handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("handshake timed out");
                        return;
                    }
                },
            };
            let service = router.map_request(|r: Request<Incoming>| r.map(Body::new));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection gives its permit back when it ends.
    let _ = permits.acquire_many(max as u32).await;
    Ok(())
}
