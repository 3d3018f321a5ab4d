//! HTTP: the route table, the middleware (cross-site guard, token, request
//! log, body limit),
//! and the mapping of every error to `{"detail": ...}`. Handlers parse and
//! validate, call one service method, and map its result; they never touch
//! SQL or processes.

pub mod actions;
pub mod clone;
pub mod cluster;
pub mod cluster_ws;
pub mod console_ws;
pub mod disks;
pub mod doc;
pub mod error;
pub mod events;
pub mod extract;
pub mod guard;
pub mod listen;
pub mod metadata;
pub mod metrics;
pub mod migrate;
pub mod network;
pub mod ports;
pub mod snapshots;
pub mod system;
pub mod templates;
pub mod ui;
pub mod vms;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::service::Service;
use error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub token: Option<Arc<str>>,
    pub vm_list: Arc<vms::ListCache>,
    pub http_metrics: Arc<metrics::HttpMetrics>,
    /// Cluster mode's handle (`--cluster`); `None` on a single host.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Every served route with its documentation, one list per module: a route
/// cannot be served without being in `/openapi.json`, nor documented
/// without being served.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(system::ApiDoc::openapi())
        .merge(system::router())
        .merge(templates::router())
        .merge(vms::router())
        .merge(actions::router())
        .merge(metadata::router())
        .merge(disks::router())
        .merge(events::router())
        .merge(console_ws::router())
        .merge(metrics::router())
        .merge(ports::router())
        .merge(network::router())
        .merge(snapshots::router())
        .merge(clone::router())
        .merge(cluster::router())
        .merge(migrate::router())
}

/// The served routes and their document, with the parts every operation
/// shares added on the whole document (modifiers of `ApiDoc` itself would
/// run before the module routers are merged in).
pub fn assembled() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, mut doc) = routes().split_for_parts();
    utoipa::Modify::modify(&doc::CommonResponses, &mut doc);
    utoipa::Modify::modify(&system::StorageFull, &mut doc);
    (routes, doc)
}

pub fn router(state: AppState) -> Router {
    let guard = Arc::new(guard::Guard::from_config(state.service.config()));
    let (routes, doc) = assembled();
    routes
        .merge(ui::router())
        .route_layer(middleware::from_fn(metrics::tag_route))
        .layer(Extension(system::Document::new(&doc)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            cluster::dispatch,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(guard, guard::enforce))
        .layer(panic_answer())
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::record,
        ))
        .with_state(state)
}

/// A handler that panics (a bug) still answers: a JSON 500 instead of a
/// dropped connection, and the panic message goes to the log only.
fn panic_answer(
) -> tower_http::catch_panic::CatchPanicLayer<fn(Box<dyn std::any::Any + Send>) -> Response> {
    fn answer(panic: Box<dyn std::any::Any + Send>) -> Response {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        tracing::error!("handler panicked: {message}");
        axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error; the server log has the details",
        ))
    }
    tower_http::catch_panic::CatchPanicLayer::custom(answer as fn(_) -> _)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method Not Allowed",
    )
}

/// Compares in constant time so the token cannot be guessed byte by byte.
fn same_token(given: &[u8], wanted: &[u8]) -> bool {
    given.len() == wanted.len()
        && given
            .iter()
            .zip(wanted)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// True when no token is configured or the request carries the right one.
pub fn authorized(app: &AppState, headers: &header::HeaderMap) -> bool {
    let Some(token) = &app.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| same_token(g.as_bytes(), token.as_bytes()))
}

/// /health answers anyone, with details only when `authorized`.
async fn require_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let (path, query) = (req.uri().path(), req.uri().query());
    if path == "/health"
        || ui::is_public(path)
        || authorized(&app, req.headers())
        || console_ws::query_token_ok(&app, path, query)
    {
        return next.run(req).await;
    }
    let mut resp = axum::response::IntoResponse::into_response(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Missing or wrong API token (Authorization: Bearer <VMAN_API_TOKEN>)",
    ));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    tracing::info!(
        target: "vman::http",
        "{method} {path} {} {:.1}ms",
        resp.status().as_u16(),
        start.elapsed().as_secs_f64() * 1000.0
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
    }

    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500_instead_of_dropping_the_connection() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app: Router = Router::new()
            .route("/boom", get(boom))
            .layer(panic_answer());
        let reply = app
            .oneshot(
                Request::builder()
                    .uri("/boom")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("an answer");
        assert_eq!(reply.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(reply.into_body(), 4096)
            .await
            .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["code"], "internal");
        assert!(json["detail"].as_str().is_some_and(|d| !d.contains("boom")));
    }
}
