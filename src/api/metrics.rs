//! GET /metrics (Prometheus text) and the request metrics behind it: every
//! answer counted by route (the matched path template, never the raw path,
//! so ids do not make new series), method and status, with a latency
//! histogram per route and method. The service adds its own families
//! (`service::metrics`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::ApiError;
use super::AppState;
use crate::service::metrics::{Histogram, Text};
use crate::sync::LockExt;

/// The route a request matched, carried on its response to `record`.
#[derive(Clone)]
struct Route(String);

#[derive(Default)]
pub struct HttpMetrics {
    /// (route, method, status) → answers.
    answers: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// (route, method) → latency.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

/// Route layer: tells `record` which route template matched.
pub async fn tag_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let mut resp = next.run(req).await;
    if let Some(route) = route {
        resp.extensions_mut().insert(Route(route));
    }
    resp
}

/// Outer layer: counts every answer (unmatched paths as `unmatched`).
pub async fn record(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let route = resp
        .extensions()
        .get::<Route>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    let status = resp.status().as_u16();
    let m = &app.http_metrics;
    *m.answers
        .lock_or_recover()
        .entry((route.clone(), method.clone(), status))
        .or_default() += 1;
    m.latency
        .lock_or_recover()
        .entry((route, method))
        .or_default()
        .observe(start.elapsed());
    resp
}

impl HttpMetrics {
    fn write(&self, out: &mut Text) {
        out.family(
            "vman_http_requests_total",
            "counter",
            "API answers by route template, method and status.",
        );
        for ((route, method, status), n) in self.answers.lock_or_recover().iter() {
            let status = status.to_string();
            out.sample(
                "vman_http_requests_total",
                &[("route", route), ("method", method), ("status", &status)],
                n,
            );
        }
        out.family(
            "vman_http_request_duration_seconds",
            "histogram",
            "Time to answer (to the response head) by route template and method.",
        );
        let latency = self.latency.lock_or_recover().clone();
        for ((route, method), h) in &latency {
            out.histogram(
                "vman_http_request_duration_seconds",
                &[("route", route), ("method", method)],
                h,
            );
        }
    }
}

/// Prometheus metrics (text format 0.0.4): VMs by state, API requests by
/// route and status with latency histograms, starts/stops/exits, exit
/// recording latency, root disk provisioning by method, and per running
/// VM its QEMU's CPU seconds, resident memory and disk I/O (the newest
/// answer of its QEMU, with its age).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let start = Instant::now();
    let mut out = Text::default();
    app.service.metrics(&mut out).await?;
    app.http_metrics.write(&mut out);
    out.family(
        "vman_metrics_scrape_seconds",
        "gauge",
        "Time this scrape took to gather.",
    );
    out.sample(
        "vman_metrics_scrape_seconds",
        &[],
        start.elapsed().as_secs_f64(),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.0,
    )
        .into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}
