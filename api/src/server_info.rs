//! `GET /v1`: who this server is and what the host has.

use std::sync::Arc;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api_version::API_VERSION;
use crate::json::ApiJson;

/// What the binary (through the instance manager) tells the API about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The host's resources.
    pub host: HostInfo,
    /// Optional capabilities of this server, by name (for instance `"virtio-blk"`).
    pub features: Vec<String>,
}

/// The host's resources, as `GET /v1` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// Online CPUs of the host.
    pub cpus: u32,
    /// Memory of the host, in bytes.
    pub memory: u64,
}

/// The body of `GET /v1`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfoResponse {
    /// Always `"kiln"`.
    pub name: String,
    /// The server's software version.
    pub version: String,
    /// The API version the server implements (`MAJOR.MINOR`).
    pub api_version: String,
    /// The host's resources.
    pub host: HostInfo,
    /// Optional capabilities of this server.
    pub features: Vec<String>,
}

impl ServerInfoResponse {
    /// The response for `info`.
    pub fn new(info: &ServerInfo) -> Self {
        Self {
            name: "kiln".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
            host: info.host,
            features: info.features.clone(),
        }
    }
}

/// Server and host information.
///
/// The server's name, version and API version, the host's CPUs and memory, and the optional
/// features this server has.
#[utoipa::path(
    get,
    path = "/v1",
    tag = "server",
    operation_id = "server_info",
    responses(
        (status = 200, description = "Server and host information", body = ServerInfoResponse),
    )
)]
pub(crate) async fn get_server_info(
    State(info): State<Arc<ServerInfo>>,
) -> ApiJson<ServerInfoResponse> {
    ApiJson(ServerInfoResponse::new(&info))
}
