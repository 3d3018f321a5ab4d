//! /vms/{vm_id}/snapshots: snapshots of a VM's disks (root and data disks;
//! stopped or running VMs), their wire types, and the take/list/get/
//! restore/delete routes.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{Invalid, Name};
use crate::service::{CreateSnapshot, SnapshotView};

/// Longest accepted `description`, in bytes.
const MAX_DESCRIPTION: usize = 1024;

/// Body of POST /vms/{vm_id}/snapshots.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub name: String,
    /// Free text, at most 1024 bytes.
    pub description: Option<String>,
    /// Copy the VM's attached data disks too (default true).
    pub include_data_disks: Option<bool>,
}

impl SnapshotRequest {
    pub fn parse(self) -> Result<CreateSnapshot, Invalid> {
        let name = Name::parse("name", &self.name)?;
        if let Some(d) = &self.description {
            if d.len() > MAX_DESCRIPTION || d.chars().any(|c| c.is_control() && c != '\n') {
                return Err(Invalid::new(
                    "description",
                    format!("must be at most {MAX_DESCRIPTION} bytes without control characters"),
                ));
            }
        }
        Ok(CreateSnapshot {
            name,
            description: self.description,
            include_data_disks: self.include_data_disks.unwrap_or(true),
        })
    }
}

/// A disk a snapshot holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotDiskResponse {
    /// `root`, or the data disk's id.
    pub id: String,
    /// `root` or `data`.
    pub kind: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Bytes the guest saw.
    pub virtual_size: u64,
    /// Bytes allocated on the host by this disk's snapshot file.
    pub size_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotResponse {
    pub name: String,
    pub description: Option<String>,
    pub created_at: String,
    /// The VM's state when it was taken: `stopped`, or `running` (disk-only,
    /// crash-consistent: the guest's RAM is not saved).
    pub vm_state_at_snapshot: String,
    /// The disks it holds: the root disk, then each data disk copied.
    pub disks: Vec<SnapshotDiskResponse>,
    /// Bytes allocated on the host by the snapshot's files.
    pub size_bytes: u64,
    /// Bytes the guest saw.
    pub virtual_size: u64,
    /// The snapshot it was taken on top of.
    pub parent: Option<String>,
}

impl From<&SnapshotView> for SnapshotResponse {
    fn from(v: &SnapshotView) -> Self {
        let s = &v.snapshot;
        Self {
            name: s.name.to_string(),
            description: s.description.clone(),
            created_at: s.created_at.clone(),
            vm_state_at_snapshot: s.vm_state.clone(),
            disks: v
                .disks
                .iter()
                .map(|d| SnapshotDiskResponse {
                    id: d.id.clone(),
                    kind: d.kind.to_owned(),
                    format: d.format.clone(),
                    virtual_size: d.virtual_size,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            size_bytes: v.size_bytes(),
            virtual_size: s.virtual_size,
            parent: s.parent.clone(),
        }
    }
}

/// The VM id and snapshot name of a path; anything that cannot be one names
/// nothing (404).
fn names(vm: &str, snap: &str) -> Result<(Name, Name), ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not found");
    Ok((
        Name::parse("id", vm).map_err(|_| not_found())?,
        Name::parse("name", snap).map_err(|_| not_found())?,
    ))
}

/// Take a snapshot of a VM's disks: stopped, or running without stopping it
/// (disk-only and crash-consistent: the guest's RAM is not saved).
#[utoipa::path(post, path = "/vms/{vm_id}/snapshots", params(("vm_id" = String, Path, description = "The VM id")),
    request_body = SnapshotRequest, tag = "snapshots",
    responses((status = 201, body = SnapshotResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<SnapshotRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let input = req.parse()?;
    let snap = app.service.create_snapshot(&id, input).await?;
    Ok((StatusCode::CREATED, Json(SnapshotResponse::from(&snap))))
}

/// A VM's snapshots, oldest first.
#[utoipa::path(get, path = "/vms/{vm_id}/snapshots", params(("vm_id" = String, Path, description = "The VM id")),
    tag = "snapshots", responses((status = 200, body = [SnapshotResponse]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<Vec<SnapshotResponse>>, ApiError> {
    let all = app.service.list_snapshots(&id)?;
    Ok(Json(all.iter().map(SnapshotResponse::from).collect()))
}

/// One snapshot.
#[utoipa::path(get, path = "/vms/{vm_id}/snapshots/{name}",
    params(("vm_id" = String, Path, description = "The VM id"), ("name" = String, Path, description = "The snapshot")),
    tag = "snapshots", responses((status = 200, body = SnapshotResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    Path((vm, snap)): Path<(String, String)>,
) -> Result<Json<SnapshotResponse>, ApiError> {
    let (id, name) = names(&vm, &snap)?;
    Ok(Json(SnapshotResponse::from(
        &app.service.get_snapshot(&id, &name)?,
    )))
}

/// Delete a snapshot; its data is merged into the snapshots and root disk
/// built on it (on a running VM where QEMU can merge live, else 400).
#[utoipa::path(delete, path = "/vms/{vm_id}/snapshots/{name}",
    params(("vm_id" = String, Path, description = "The VM id"), ("name" = String, Path, description = "The snapshot")),
    tag = "snapshots", responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path((vm, snap)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (id, name) = names(&vm, &snap)?;
    app.service.delete_snapshot(&id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Restore a stopped VM's disks to a snapshot (root: a new empty overlay on
/// it; data disks: their copies; later snapshots stay).
#[utoipa::path(post, path = "/vms/{vm_id}/snapshots/{name}/restore",
    params(("vm_id" = String, Path, description = "The VM id"), ("name" = String, Path, description = "The snapshot")),
    tag = "snapshots", responses((status = 200, body = SnapshotResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn restore(
    State(app): State<AppState>,
    Path((vm, snap)): Path<(String, String)>,
) -> Result<Json<SnapshotResponse>, ApiError> {
    let (id, name) = names(&vm, &snap)?;
    Ok(Json(SnapshotResponse::from(
        &app.service.restore_snapshot(&id, &name).await?,
    )))
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, delete))
        .routes(routes!(restore))
}
