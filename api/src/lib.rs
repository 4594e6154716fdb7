//! Kiln's REST API (axum + tokio): the contract is the OpenAPI document it serves, and the
//! reference rendered from it (`docs/API.md`).
//!
//! The binary builds an [`AppState`], makes a [`router()`] of it and serves that router on a
//! Unix socket ([`listen::serve_unix`]) and optionally on TCP ([`listen::serve_tcp`]).
//!
//! Modules:
//! - [`error`]: [`ApiError`], the one error shape;
//! - [`json`]: [`ApiJson`], the JSON extractor whose rejections are [`ApiError`]s;
//! - [`request_id`], [`api_version`], [`metrics`] and the private `error_shape`: middleware;
//! - [`auth`]: the TCP bearer token; [`listen`]: the listeners;
//! - [`mod@router`]: [`AppState`], the route table and the router; [`openapi`]: the document;
//!   [`reference`]: the Markdown reference (`docs/API.md`) rendered from it;
//! - [`server_info`]: `GET /v1`; `instances`, `console`, `operations`, `events`, `disks`,
//!   `images`: the routes of each resource, each a call of the control plane;
//! - [`wire`]: the request and response bodies, with their schemas; [`resource`]: paths and
//!   ETags; `plane`, `respond`, `streaming`: what the handlers share.
//!
//! Only this crate knows HTTP: the control plane below it names nothing by path.

#![warn(missing_docs)]

pub mod accept;
pub mod api_version;
pub mod auth;
mod conditional;
pub mod console;
mod disks;
pub mod error;
mod error_shape;
mod events;
mod images;
mod instances;
pub mod json;
pub mod listen;
mod listing;
pub mod metrics;
pub mod openapi;
mod operations;
mod plane;
pub mod reference;
pub mod request_id;
pub mod resource;
mod respond;
pub mod router;
pub mod server_info;
mod snapshots;
mod streaming;
pub mod tls;
pub mod wire;

pub use accept::Limits;
pub use api_version::API_VERSION;
pub use error::{ApiError, ErrorCode};
pub use json::{ApiJson, JSON_BODY_LIMIT};
pub use listen::{serve_tcp, serve_unix, shutdown_signal, ListenError, TcpServer, UnixServer};
pub use metrics::Metrics;
pub use openapi::ApiDoc;
pub use request_id::RequestId;
pub use router::{api_routes, router, routes, ApiRouter, AppState, ManagerRef, RouteInfo};
pub use server_info::{HostInfo, ServerInfo, ServerInfoResponse};
