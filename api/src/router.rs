//! The router: [`AppState`], the route table ([`ApiRouter`]) and [`router`], which puts every
//! route behind the API's middleware.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::json::JSON_BODY_LIMIT;
use crate::metrics::Metrics;
use crate::server_info::ServerInfo;
use crate::{
    api_version, conditional, console, disks, error_shape, events, images, instances, metrics,
    openapi, operations, request_id, server_info, snapshots,
};

/// What every handler can reach. Cheap to clone.
#[derive(Debug, Clone, FromRef)]
pub struct AppState {
    /// Server and host information for `GET /v1`.
    pub info: Arc<ServerInfo>,
    /// The process's metrics registry.
    pub metrics: Metrics,
    /// The instance manager (absent in servers built for HTTP-only tests).
    pub manager: ManagerRef,
}

/// The host's [`control::Manager`], if this server has one.
#[derive(Clone, Default)]
pub struct ManagerRef(pub Option<Arc<control::Manager>>);

impl std::fmt::Debug for ManagerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ManagerRef(Some)"
        } else {
            "ManagerRef(None)"
        })
    }
}

impl AppState {
    /// The state for a server with `info`, recording into `metrics`.
    pub fn new(info: ServerInfo, metrics: Metrics) -> Self {
        Self {
            info: Arc::new(info),
            metrics,
            manager: ManagerRef::default(),
        }
    }

    /// The same state, serving `manager`'s instances.
    pub fn with_manager(mut self, manager: Arc<control::Manager>) -> Self {
        self.manager = ManagerRef(Some(manager));
        self
    }
}

/// One route the router serves: a method and a path template (`/v1/instances/{instance}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteInfo {
    /// Upper-case HTTP method (`GET`).
    pub method: String,
    /// Path template, in axum's and OpenAPI's `{param}` syntax.
    pub path: String,
}

impl std::fmt::Display for RouteInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// An axum router that remembers its routes (method and path), so that the route table can be
/// compared with the OpenAPI document.
#[derive(Debug, Default)]
pub struct ApiRouter {
    router: Router<AppState>,
    routes: Vec<RouteInfo>,
}

impl ApiRouter {
    /// An empty route table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` for `method` on `path`, with the JSON body size limit.
    ///
    /// # Panics
    /// If `method` is not one axum can route, or the route is already there.
    pub fn route<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = method_filter(&method);
        self.add(method, path, on(filter, handler))
    }

    /// Adds `handler` for `method` on `path` without a body size limit: for streamed bodies
    /// (disk import, image upload) that the handler reads itself.
    ///
    /// # Panics
    /// As [`ApiRouter::route`].
    pub fn streaming_route<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = method_filter(&method);
        self.add(
            method,
            path,
            on(filter, handler).layer(DefaultBodyLimit::disable()),
        )
    }

    /// The routes added so far.
    pub fn routes(&self) -> &[RouteInfo] {
        &self.routes
    }

    /// The routes behind the API's middleware, with the JSON 404 fallback, serving `state`:
    /// request ids, tracing spans, metrics, the error shape, `api-version` checks, panic
    /// catching and the body size limit.
    pub fn into_router(self, state: AppState) -> Router {
        let middleware = ServiceBuilder::new()
            .layer(from_fn(request_id::assign))
            .layer(from_fn_with_state(state.metrics.clone(), metrics::record))
            .layer(from_fn(error_shape::normalize))
            .layer(from_fn(api_version::check))
            .layer(from_fn(conditional::not_modified))
            .layer(CatchPanicLayer::custom(error_shape::panic_response))
            .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT));
        self.router
            .fallback(error_shape::not_found)
            .layer(middleware)
            .with_state(state)
    }

    fn add(mut self, method: Method, path: &'static str, route: MethodRouter<AppState>) -> Self {
        let info = RouteInfo {
            method: method.as_str().to_string(),
            path: path.to_string(),
        };
        assert!(!self.routes.contains(&info), "route {info} added twice");
        self.routes.push(info);
        self.router = self.router.route(path, route);
        self
    }
}

fn method_filter(method: &Method) -> MethodFilter {
    MethodFilter::try_from(method.clone())
        .unwrap_or_else(|_| panic!("method {method} cannot be routed"))
}

/// Every route of the API, without middleware or state.
pub fn api_routes() -> ApiRouter {
    ApiRouter::new()
        .route(Method::GET, "/v1", server_info::get_server_info)
        .route(Method::GET, "/v1/openapi.json", openapi::get_openapi)
        .route(Method::GET, "/metrics", metrics::get_metrics)
        .route(Method::GET, "/v1/instances", instances::list)
        .route(Method::POST, "/v1/instances", instances::create)
        .route(Method::GET, "/v1/instances/{instance}", instances::get)
        .route(Method::PATCH, "/v1/instances/{instance}", instances::patch)
        .route(
            Method::DELETE,
            "/v1/instances/{instance}",
            instances::delete,
        )
        .route(
            Method::POST,
            "/v1/instances/{instance}/actions",
            instances::action,
        )
        .route(
            Method::POST,
            "/v1/instances/{instance}/disks",
            instances::attach,
        )
        .route(
            Method::DELETE,
            "/v1/instances/{instance}/disks/{disk}",
            instances::detach,
        )
        .route(
            Method::GET,
            "/v1/instances/{instance}/console",
            console::history,
        )
        .route(
            Method::GET,
            "/v1/instances/{instance}/console/stream",
            console::stream,
        )
        .route(Method::GET, "/v1/operations", operations::list)
        .route(Method::GET, "/v1/operations/{id}", operations::get)
        .route(Method::GET, "/v1/operations/{id}/wait", operations::wait)
        .route(Method::GET, "/v1/events", events::stream)
        .route(Method::GET, "/v1/disks", disks::list)
        .route(Method::POST, "/v1/disks", disks::create)
        .streaming_route(Method::POST, "/v1/disks/import", disks::import)
        .route(Method::GET, "/v1/disks/{disk}", disks::get)
        .route(Method::PATCH, "/v1/disks/{disk}", disks::patch)
        .route(Method::DELETE, "/v1/disks/{disk}", disks::delete)
        .route(Method::GET, "/v1/disks/{disk}/export", disks::export)
        .route(
            Method::POST,
            "/v1/instances/{instance}/snapshots",
            snapshots::take,
        )
        .route(Method::GET, "/v1/snapshots", snapshots::list)
        .route(Method::GET, "/v1/snapshots/{snapshot}", snapshots::get)
        .route(
            Method::DELETE,
            "/v1/snapshots/{snapshot}",
            snapshots::delete,
        )
        .route(
            Method::POST,
            "/v1/disks/{disk}/snapshots",
            snapshots::disk_take,
        )
        .route(
            Method::GET,
            "/v1/disks/{disk}/snapshots",
            snapshots::disk_list,
        )
        .route(
            Method::GET,
            "/v1/disks/{disk}/snapshots/{snapshot}",
            snapshots::disk_get,
        )
        .route(
            Method::DELETE,
            "/v1/disks/{disk}/snapshots/{snapshot}",
            snapshots::disk_delete,
        )
        .route(
            Method::POST,
            "/v1/disks/{disk}/snapshots/{snapshot}/rollback",
            snapshots::disk_rollback,
        )
        .route(Method::GET, "/v1/images", images::list)
        .route(Method::POST, "/v1/images", images::create)
        .streaming_route(Method::POST, "/v1/images/upload", images::upload)
        .route(Method::GET, "/v1/images/{image}", images::get)
        .route(Method::DELETE, "/v1/images/{image}", images::delete)
}

/// The routes [`router`] serves (method and path), for checks against the OpenAPI document.
pub fn routes() -> Vec<RouteInfo> {
    api_routes().routes
}

/// The API's router, ready to serve on a listener (see [`crate::listen`]).
pub fn router(state: AppState) -> Router {
    api_routes().into_router(state)
}
