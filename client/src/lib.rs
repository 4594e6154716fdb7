//! The typed client of Kiln's REST API (`docs/API.md`, rendered from the OpenAPI document the
//! server serves at `/v1/openapi.json`): the one HTTP client of the workspace. The CLI, the
//! integration tests and the benches all talk to `kiln serve` through it.
//!
//! It is written once, by hand, against the document rather than generated from it
//! (progenitor): it uses the API's own wire types (`api::wire`), so the two cannot drift
//! apart, and it reaches the server over its Unix socket, which generated clients (reqwest)
//! do not; it streams imports, exports, the console websocket and the event stream, which
//! generators model poorly. The generated clients of other languages are checked against the
//! same document in CI (`tests/openapi/`).
//!
//! Two layers:
//! - typed calls, one per operation of the API ([`Client::instance_create`],
//!   [`Client::disk_import`], …), answering the wire types or [`Error::Api`];
//! - the raw layer under them ([`Client::request`]): any method, path, headers and body,
//!   answered with the status, headers and body as they came, for tests of the HTTP contract
//!   itself (malformed bodies, wrong content types, error shapes).
//!
//! Modules: `connection` (the transport and the connections kept), [`body`] (request bodies,
//! a file streamed included), `request` (the raw layer), `calls` (the typed calls), `console`
//! (history and websocket).

#![warn(missing_docs)]

pub mod body;
mod calls;
mod connection;
mod console;
mod error;
mod request;
mod snapshots;

pub use api::wire;
pub use bytes::Bytes;
pub use calls::Tagged;
pub use connection::{Client, Endpoint, Io};
pub use console::{ConsoleChunk, ConsoleSocket};
pub use error::Error;
pub use hyper::{HeaderMap, Method, StatusCode};
pub use request::{Reply, RequestBuilder, Streamed};
pub use tokio_tungstenite::tungstenite::Message;
