//! Cold migration over HTTP (issue 14): the public
//! `POST /vms/{vm_id}/actions/migrate`, and the node-to-node routes under
//! `/cluster/internal/` the source calls on the target (import a disk file
//! as a streamed body, adopt the VM record, drop an import). The internal
//! routes answer 404 outside cluster mode and need `X-Vman-Cluster-Token`
//! besides the API token: `api/cluster.rs`'s dispatch refuses a missing or
//! wrong one (401) before these handlers run; they compare it again in
//! constant time (403) as a second guard.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use futures_util::TryStreamExt;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{ImageFormat, Name};
use crate::service::migrate::{
    AdoptRecord, Announced, ImportKind, MigrationReport, FORMAT_HEADER, SHA_HEADER, SIZE_HEADER,
    TOKEN_HEADER,
};

/// Where internal routes live (the API token check leaves them to
/// `cluster_auth`).
pub const INTERNAL_PREFIX: &str = "/cluster/internal/";

/// Body of `POST /vms/{vm_id}/actions/migrate`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MigrateRequest {
    /// The node to move the VM to.
    pub node: String,
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not found")
}

/// Outside cluster mode the node-to-node routes do not exist.
fn not_a_cluster() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found: node-to-node routes exist only in cluster mode (--cluster)",
    )
}

/// The cluster token check of internal routes.
fn cluster_auth(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let cluster = &app.service.config().cluster;
    let Some(wanted) = cluster.cluster_token.as_deref().filter(|_| cluster.enabled) else {
        return Err(not_a_cluster());
    };
    let Some(given) = headers.get(TOKEN_HEADER) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Node-to-node route: the X-Vman-Cluster-Token header is missing",
        ));
    };
    if !super::same_token(given.as_bytes(), wanted.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Node-to-node route: wrong X-Vman-Cluster-Token",
        ));
    }
    Ok(())
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::invalid(name, "header required"))
}

/// Move a stopped VM, its root disk and data disks to another node of the
/// cluster. Answers once the placement moved and this node forgot the VM.
#[utoipa::path(post, path = "/vms/{vm_id}/actions/migrate", params(("vm_id" = String, Path, description = "The VM id")), request_body = MigrateRequest, tag = "vms",
    responses((status = 200, body = MigrationReport), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn migrate(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<MigrateRequest>,
) -> Result<Json<MigrationReport>, ApiError> {
    Name::parse("node", &req.node)?;
    Ok(Json(app.service.migrate_vm(&id, &req.node).await?))
}

/// Node to node: receive one disk file of a VM being migrated here. The
/// body is the file; `X-Vman-Size` and `X-Vman-Sha256` announce it and
/// `X-Vman-Format` (qcow2|raw) pins its format. It is written to a
/// temporary file, checked, fsynced and renamed into place; on a mismatch
/// nothing is kept (400 `transfer_refused`).
#[utoipa::path(put, path = "/cluster/internal/import/{vm_id}/{kind}/{file}",
    params(("vm_id" = String, Path, description = "The VM id"),
           ("kind" = String, Path, description = "root or disk"),
           ("file" = String, Path, description = "root.qcow2, or the disk id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"), tag = "cluster",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn import(
    State(app): State<AppState>,
    Path((vm, kind, file)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    cluster_auth(&app, &headers)?;
    let id = Name::parse("vm_id", &vm).map_err(|_| not_found())?;
    let kind = ImportKind::parse(&kind).ok_or_else(not_found)?;
    let size: u64 = header(&headers, SIZE_HEADER)?
        .parse()
        .map_err(|_| ApiError::invalid(SIZE_HEADER, "a byte count"))?;
    let sha = header(&headers, SHA_HEADER)?;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::invalid(SHA_HEADER, "64 hex digits"));
    }
    let format = match headers.get(FORMAT_HEADER).and_then(|v| v.to_str().ok()) {
        None => ImageFormat::Qcow2,
        Some(raw) => ImageFormat::parse(raw)
            .ok_or_else(|| ApiError::invalid(FORMAT_HEADER, "qcow2 or raw"))?,
    };
    let stream = body.into_data_stream().map_err(|e| e.to_string());
    let announced = Announced {
        size,
        sha256: sha.to_ascii_lowercase(),
        format,
    };
    app.service
        .import_file(&id, kind, &file, announced, stream)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Node to node: record the VM whose files were imported (stopped; not
/// startable here until the placement names this node).
#[utoipa::path(post, path = "/cluster/internal/adopt/{vm_id}", params(("vm_id" = String, Path, description = "The VM id")),
    request_body = AdoptRecord, tag = "cluster",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn adopt(
    State(app): State<AppState>,
    Path(vm): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    cluster_auth(&app, &headers)?;
    let id = Name::parse("vm_id", &vm).map_err(|_| not_found())?;
    let record: AdoptRecord = super::extract::parse_json(&body)?;
    app.service.adopt_migrated(&id, record).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Node to node: forget what was imported for a VM: its record while it is
/// still marked as received, and the files this node wrote for it (nothing
/// else). 204 also when there was nothing.
#[utoipa::path(delete, path = "/cluster/internal/import/{vm_id}", params(("vm_id" = String, Path, description = "The VM id")), tag = "cluster",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn drop_import(
    State(app): State<AppState>,
    Path(vm): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    cluster_auth(&app, &headers)?;
    let id = Name::parse("vm_id", &vm).map_err(|_| not_found())?;
    app.service.drop_import(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(migrate))
        .routes(routes!(import))
        .routes(routes!(adopt))
        .routes(routes!(drop_import))
}
