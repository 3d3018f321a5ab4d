//! /health, the OpenAPI document and the interactive docs.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::Extension;
use axum::Json;
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

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
    let report = app.service.check_health().await;
    let ok = report.ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = HealthResponse {
        status: if ok { "ok" } else { "degraded" },
        service: Some("vman"),
        version: Some(env!("CARGO_PKG_VERSION")),
        checks: Some(report.checks),
    };
    if !super::authorized(&app, &headers) {
        body.service = None;
        body.version = None;
        body.checks = None;
    }
    (status, Json(body))
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
    pub last_issues: Vec<crate::service::Issue>,
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

/// The document's head and shared schemas; each module's `router()` adds
/// its paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vman",
        description = "A VM manager for one Linux host: QEMU virtual machines over REST. \
            Sizes are GiB (2^30 bytes, as `qemu-img create ... {size}G`): `ram_amount`, \
            a data disk's `size`, a template's `disk_size_gb`, and the empty 10 GiB root disk \
            made when there is no boot disk to copy."
    ),
    components(schemas(super::error::ErrorBody))
)]
pub struct ApiDoc;

/// Every write may meet a full filesystem: documents its 507 once for all
/// POST, PUT and DELETE routes.
pub(crate) struct StorageFull;

impl utoipa::Modify for StorageFull {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let response = ResponseBuilder::new()
            .description("No space left on the storage; the detail says what was (not) done")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.post, &mut item.put, &mut item.delete]
                .into_iter()
                .flatten()
            {
                op.responses
                    .responses
                    .entry("507".into())
                    .or_insert_with(|| response.clone().into());
            }
        }
    }
}

/// The served document, serialised once from what `api::routes` built.
#[derive(Clone)]
pub struct Document {
    json: Result<Bytes, String>,
    yaml: Result<Bytes, String>,
}

impl Document {
    pub fn new(doc: &utoipa::openapi::OpenApi) -> Self {
        Self {
            json: doc.to_json().map(Bytes::from).map_err(|e| e.to_string()),
            yaml: doc.to_yaml().map(Bytes::from).map_err(|e| e.to_string()),
        }
    }
}

/// This OpenAPI document, as JSON.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3 document of every route", content_type = "application/json")))]
pub async fn openapi_json(Extension(doc): Extension<Document>) -> impl IntoResponse {
    match doc.json {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => unserialisable("json", &e),
    }
}

/// This OpenAPI document, as YAML.
#[utoipa::path(get, path = "/openapi.yaml", tag = "system",
    responses((status = 200, description = "The OpenAPI 3 document of every route", content_type = "application/yaml")))]
pub async fn openapi_yaml(Extension(doc): Extension<Document>) -> impl IntoResponse {
    match doc.yaml {
        Ok(yaml) => ([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response(),
        Err(e) => unserialisable("yaml", &e),
    }
}

fn unserialisable(what: &str, e: &str) -> axum::response::Response {
    super::error::ApiError::from(crate::service::ServiceError::Internal(format!(
        "openapi {what}: {e}"
    )))
    .into_response()
}

/// Interactive docs: RapiDoc reading /openapi.json.
#[utoipa::path(get, path = "/docs", tag = "system",
    responses((status = 200, description = "An HTML page", content_type = "text/html")))]
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

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(observer_status))
        .routes(routes!(openapi_json))
        .routes(routes!(openapi_yaml))
        .routes(routes!(docs))
}
