//! Listeners: the Unix socket (local trust, guarded by its mode 0660) and TCP (bearer token
//! required). Both serve until a shutdown future resolves, then finish the requests in flight.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::middleware::from_fn_with_state;
use axum::Router;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::accept::{self, Limits};
use crate::auth::{self, BearerToken, TokenError};

/// Mode of the Unix socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// How long a connect() to an existing socket may take before it counts as live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Backlog of the listening sockets.
const BACKLOG: i32 = 1024;

/// Why a listener could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A server answers on the socket path.
    #[error("another kiln serve is running on {0}")]
    AlreadyRunning(PathBuf),
    /// Something other than a socket is at the socket path; it is left alone.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The TCP token could not be had: no TCP listener without one.
    #[error("refusing to listen on TCP: {0}")]
    Token(#[from] TokenError),
    /// The TLS certificate or key cannot be used.
    #[error("refusing to listen on TCP: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ListenError {
    let context = context.into();
    move |source| ListenError::Io { context, source }
}

/// A bound Unix socket, ready to serve. The socket file is removed when this (or the server
/// it became) is dropped, unless another file has replaced it.
#[derive(Debug)]
pub struct UnixServer {
    listener: tokio::net::UnixListener,
    file: SocketFile,
    limits: Limits,
}

impl UnixServer {
    /// Creates the socket at `path` with mode 0660: creates the parent directory if missing;
    /// replaces a stale socket (one nobody accepts on); refuses if a server answers there or
    /// the path is anything but a socket. No connection is accepted before the mode is set.
    pub async fn bind(path: &Path) -> Result<Self, ListenError> {
        Self::bind_with_group(path, None).await
    }

    /// [`UnixServer::bind`], the socket's group set to `group` (a gid) before anyone can
    /// connect: the members of that group may use the API.
    pub async fn bind_with_group(path: &Path, group: Option<u32>) -> Result<Self, ListenError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io_error(format!("cannot create {}", parent.display())))?;
        }
        remove_stale_socket(path).await?;

        let shown = path.display().to_string();
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)
            .map_err(io_error("cannot create a Unix socket"))?;
        let address = SockAddr::unix(path).map_err(io_error(format!("bad socket path {shown}")))?;
        socket
            .bind(&address)
            .map_err(io_error(format!("cannot bind {shown}")))?;
        // Bound but not listening: connect() is refused until listen(), so the mode is right
        // before anyone can get in.
        let file = SocketFile::new(path).map_err(io_error(format!("cannot stat {shown}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_error(format!("cannot chmod {shown}")))?;
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid))
                .map_err(io_error(format!("cannot give {shown} to group {gid}")))?;
        }
        socket
            .listen(BACKLOG)
            .map_err(io_error(format!("cannot listen on {shown}")))?;
        socket
            .set_nonblocking(true)
            .map_err(io_error("cannot make the socket non-blocking"))?;
        let listener = tokio::net::UnixListener::from_std(socket.into())
            .map_err(io_error("cannot register the socket with tokio"))?;
        Ok(Self {
            listener,
            file,
            limits: Limits::default(),
        })
    }

    /// Serves within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves `router` until `shutdown` resolves and the requests in flight are done, then
    /// removes the socket file.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ListenError> {
        let Self {
            listener,
            file,
            limits,
        } = self;
        tracing::info!(socket = %file.path.display(), "API listening on Unix socket");
        let result = accept::serve(listener, router, limits, None, shutdown)
            .await
            .map_err(io_error(format!("serving {}", file.path.display())));
        drop(file);
        result
    }
}

/// Binds the Unix socket at `path` ([`UnixServer::bind`]) and serves `router` on it until
/// `shutdown` resolves.
pub async fn serve_unix(
    path: &Path,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ListenError> {
    UnixServer::bind(path).await?.serve(router, shutdown).await
}

/// A bound TCP listener with its bearer token, ready to serve.
pub struct TcpServer {
    listener: tokio::net::TcpListener,
    token: BearerToken,
    limits: Limits,
    tls: Option<accept::Wrap>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer")
            .field("listener", &self.listener)
            .field("token", &self.token)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl TcpServer {
    /// Reads the token from `token_file` (refusing to go on if it is unreadable or empty), then
    /// binds `addr`.
    pub async fn bind(addr: SocketAddr, token_file: &Path) -> Result<Self, ListenError> {
        let token = BearerToken::from_file(token_file)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io_error(format!("cannot listen on {addr}")))?;
        Ok(Self {
            listener,
            token,
            limits: Limits::default(),
            tls: None,
        })
    }

    /// Serves TLS with the certificate chain `cert` and key `key` (PEM files).
    pub fn with_tls(mut self, cert: &Path, key: &Path) -> Result<Self, ListenError> {
        let config = crate::tls::server_config(cert, key)?;
        self.tls = Some(crate::tls::wrap(config));
        Ok(self)
    }

    /// Serves within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves `router`, every request authenticated, until `shutdown` resolves and the
    /// requests in flight are done.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ListenError> {
        let addr = self.local_addr();
        let tls = if self.tls.is_some() { "TLS" } else { "plain" };
        tracing::info!(%addr, "API listening on TCP ({tls}, bearer token required)");
        let router = router.layer(from_fn_with_state(self.token, auth::require));
        accept::serve(self.listener, router, self.limits, self.tls, shutdown)
            .await
            .map_err(io_error(format!("serving {addr}")))
    }
}

/// Reads the token from `token_file`, binds `addr` ([`TcpServer::bind`]) and serves `router`
/// there until `shutdown` resolves.
pub async fn serve_tcp(
    addr: SocketAddr,
    token_file: &Path,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ListenError> {
    TcpServer::bind(addr, token_file)
        .await?
        .serve(router, shutdown)
        .await
}

/// Resolves on SIGINT or SIGTERM: the usual `shutdown` future of a server.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Makes room for a new socket at `path`: nothing there is fine; a socket nobody accepts on is
/// removed; a live socket or anything that is not a socket is refused and left alone.
async fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(format!("cannot stat {shown}"))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(path.to_path_buf()));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
        Ok(Ok(_)) | Err(_) => Err(ListenError::AlreadyRunning(path.to_path_buf())),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %shown, "removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io_error(format!("cannot remove stale socket {shown}"))(e))
                }
                _ => Ok(()),
            }
        }
        Ok(Err(e)) => Err(io_error(format!("cannot check whether {shown} is in use"))(
            e,
        )),
    }
}

/// The socket file this process created; removed on drop if it is still that file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), "cannot remove socket: {e}");
            }
        }
    }
}
