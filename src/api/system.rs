//! /health, the OpenAPI document and the interactive docs.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::Json;
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::{OpenApi, ToSchema};

use super::doc::CommonResponses;
use super::AppState;
use crate::service::Check;

/// With a token configured, a request without it gets `status` only.
#[derive(Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `degraded` when any check fails.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<BTreeMap<&'static str, Check>>,
}

/// Service health; 503 with the same body when degraded. Without the token
/// (when one is configured) only `status` is shown.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn health(State(app): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let (status, mut body) = health_report(&app).await;
    if !super::authorized(&app, &headers) {
        body.service = None;
        body.version = None;
        body.checks = None;
    }
    (status, Json(body))
}

async fn health_report(app: &AppState) -> (StatusCode, HealthResponse) {
    let service = app.service.clone();
    let report = tokio::task::spawn_blocking(move || service.health()).await;
    let Ok(report) = report else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            HealthResponse {
                status: "degraded",
                service: Some("vman"),
                version: Some(env!("CARGO_PKG_VERSION")),
                checks: Some(BTreeMap::new()),
            },
        );
    };
    let ok = report.ok();
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        HealthResponse {
            status: if ok { "ok" } else { "degraded" },
            service: Some("vman"),
            version: Some(env!("CARGO_PKG_VERSION")),
            checks: Some(report.checks),
        },
    )
}

#[derive(Serialize, ToSchema)]
pub struct ObserverStatus {
    /// `running` once the first pass is done, `starting` before.
    pub status: &'static str,
    /// Seconds between passes.
    pub check_interval: u64,
    pub passes: u64,
    pub last_check_at: Option<String>,
    pub last_issues_count: usize,
    pub last_issues: Vec<crate::observer::Issue>,
}

/// What the last coherence pass found.
#[utoipa::path(get, path = "/observer/status", tag = "system",
    responses((status = 200, body = ObserverStatus)))]
pub async fn observer_status(State(app): State<AppState>) -> Json<ObserverStatus> {
    let report = app.service.observer_report();
    Json(ObserverStatus {
        status: if report.passes > 0 {
            "running"
        } else {
            "starting"
        },
        check_interval: app.service.config().observer_interval,
        passes: report.passes,
        last_check_at: report.last_check_at,
        last_issues_count: report.issues.len(),
        last_issues: report.issues,
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vman",
        description = "A VM manager for one Linux host: QEMU virtual machines over REST."
    ),
    paths(
        health,
        observer_status,
        super::templates::create,
        super::templates::list,
        super::templates::get,
        super::templates::delete,
        super::vms::create,
        super::vms::list,
        super::vms::get,
        super::vms::delete,
        super::actions::start,
        super::actions::stop,
        super::actions::restart,
        super::actions::console,
        super::actions::console_input,
        super::metadata::put,
        super::metadata::get,
        super::metadata::delete,
        super::disks::create,
        super::disks::list,
        super::disks::get,
        super::disks::delete,
        super::disks::attach,
        super::disks::detach,
        super::disks::resize,
    ),
    components(schemas(super::error::ErrorBody)),
    modifiers(&CommonResponses)
)]
pub struct ApiDoc;

pub async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

pub async fn openapi_yaml() -> impl IntoResponse {
    match ApiDoc::openapi().to_yaml() {
        Ok(yaml) => ([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response(),
        Err(e) => super::error::ApiError::from(crate::service::ServiceError::Internal(format!(
            "openapi yaml: {e}"
        )))
        .into_response(),
    }
}

/// Interactive docs: RapiDoc reading /openapi.json.
pub async fn docs() -> Html<&'static str> {
    Html(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>vman API</title>
<script type="module" src="https://unpkg.com/rapidoc/dist/rapidoc-min.js"></script></head>
<body><rapi-doc spec-url="/openapi.json" render-style="read" allow-try="true"
 show-header="false"></rapi-doc>
<noscript>The API description is at <a href="/openapi.yaml">/openapi.yaml</a>.</noscript>
</body></html>"#,
    )
}
