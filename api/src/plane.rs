//! How handlers reach the control plane: the [`Mgr`] extractor, and [`blocking`] for calls
//! that block (disk copies, imports, forced deletes), which run off the async workers.

use std::sync::Arc;

use control::Manager;

use crate::error::ApiError;
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

/// Runs a blocking control-plane call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, control::Error> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?
        .map_err(ApiError::from)
}
