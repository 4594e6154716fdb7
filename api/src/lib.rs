//! Kiln's REST API (axum + tokio), to come: see `../shared/design/API.md`.
