//! /disks: data disks, their wire types, parsing into `CreateDisk`, and the
//! create/list/get/delete, attach, detach and resize routes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{Invalid, Name, MAX_DISK_GB};
use crate::service::{CreateDisk, DiskView, ServiceError};

/// Longest accepted `mount_point`.
const MAX_MOUNT_POINT: usize = 4096;

/// Body of POST /disks.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DiskRequest {
    /// Size in GiB (2^30 bytes, like `qemu-img create ... {size}G`), at least 1.
    #[schema(minimum = 1, maximum = 65536)]
    pub size: u64,
    /// Where the user means to mount it in the guest: an absolute path,
    /// kept as a label (vman does not mount anything).
    pub mount_point: Option<String>,
    /// The disk id; a UUID v4 is generated when absent.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub name: Option<String>,
}

fn parse_size(size: u64) -> Result<u64, Invalid> {
    if (1..=MAX_DISK_GB).contains(&size) {
        Ok(size)
    } else {
        Err(Invalid::new(
            "size",
            format!("must be between 1 and {MAX_DISK_GB} (GiB)"),
        ))
    }
}

impl DiskRequest {
    pub fn parse(self) -> Result<CreateDisk, Invalid> {
        let size_gb = parse_size(self.size)?;
        if let Some(m) = &self.mount_point {
            if !m.starts_with('/') || m.len() > MAX_MOUNT_POINT || m.contains('\0') {
                return Err(Invalid::new(
                    "mount_point",
                    format!("must be an absolute path (starting with /) of at most {MAX_MOUNT_POINT} bytes"),
                ));
            }
        }
        Ok(CreateDisk {
            id: self.name.map(|n| Name::parse("name", &n)).transpose()?,
            size_gb,
            mount_point: self.mount_point,
        })
    }
}

/// Body of POST /disks/{id}/attach.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AttachRequest {
    /// The VM to attach to. Missing, null or empty: 400 `vm_id is required`
    /// (as the first VMAN answered).
    pub vm_id: Option<String>,
}

impl AttachRequest {
    /// The VM named; a string that cannot be a VM id names no VM (404).
    fn vm(&self) -> Result<Name, ApiError> {
        match self.vm_id.as_deref() {
            None | Some("") => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "required",
                "vm_id is required",
            )),
            Some(raw) => Ok(Name::parse("vm_id", raw).map_err(|_| ServiceError::NotFound("VM"))?),
        }
    }
}

/// Body of POST /disks/{id}/resize.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResizeRequest {
    /// New size in GiB (2^30 bytes); not smaller than the current one.
    #[schema(minimum = 1, maximum = 65536)]
    pub size: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DiskResponse {
    pub id: String,
    /// Size in GiB (2^30 bytes).
    pub size: u64,
    pub mount_point: Option<String>,
    /// `available`, `attached`, or `error` (its file is missing or unusable).
    pub state: &'static str,
    pub path: String,
    /// Bytes the guest sees.
    pub virtual_size: Option<u64>,
    /// Bytes allocated on the host.
    pub allocated_size: Option<u64>,
    /// The VM it is attached to.
    pub vm_id: Option<String>,
    /// The hot-plug root port (`hp<slot>`) it uses in that VM.
    pub slot: Option<u8>,
    /// The guest's path for it, by its serial (the first 20 bytes of the id).
    pub device: String,
    /// Why the state is `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&DiskView> for DiskResponse {
    fn from(v: &DiskView) -> Self {
        let d = &v.disk;
        Self {
            id: d.id.to_string(),
            size: d.size_gb,
            mount_point: d.mount_point.clone(),
            state: v.state.as_str(),
            path: d.path.clone(),
            virtual_size: v.virtual_size,
            allocated_size: v.allocated_size,
            vm_id: d.attachment.as_ref().map(|(vm, _)| vm.to_string()),
            slot: d.attachment.as_ref().map(|(_, s)| *s),
            device: v.device(),
            error: v.error.clone(),
            created_at: d.created_at.clone(),
            updated_at: d.updated_at.clone(),
        }
    }
}

/// Answer of attach and detach: a status and the disk as it now is.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiskActionResponse {
    /// `attached` or `detached`.
    pub status: &'static str,
    #[serde(flatten)]
    pub disk: DiskResponse,
}

/// Create a data disk (an empty qcow2 in `{storage}/disks`).
#[utoipa::path(post, path = "/disks", request_body = DiskRequest, tag = "disks",
    responses((status = 201, body = DiskResponse), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Body(req): Body<DiskRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let input = req.parse()?;
    let disk = app.service.create_disk(input).await?;
    Ok((StatusCode::CREATED, Json(DiskResponse::from(&disk))))
}

/// List data disks.
#[utoipa::path(get, path = "/disks", tag = "disks",
    responses((status = 200, body = [DiskResponse])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<DiskResponse>>, ApiError> {
    let all = app.service.list_disks().await?;
    Ok(Json(all.iter().map(DiskResponse::from).collect()))
}

/// One data disk.
#[utoipa::path(get, path = "/disks/{id}", params(("id" = String, Path, description = "The disk id")), tag = "disks",
    responses((status = 200, body = DiskResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<DiskResponse>, ApiError> {
    Ok(Json(DiskResponse::from(&app.service.get_disk(&id).await?)))
}

/// Delete a data disk that is not attached, and its file. A disk that
/// snapshots hold needs `?force=true` (their copies stay).
#[utoipa::path(delete, path = "/disks/{id}", params(("id" = String, Path, description = "The disk id"),
        ("force" = Option<bool>, Query, description = "delete it although snapshots hold it")), tag = "disks",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    PathName(id): PathName,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let force = match query.get("force").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => return Err(ApiError::invalid("force", "must be true or false")),
    };
    app.service.delete_disk(&id, force)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach a disk to a VM: hot-plugged into a running VM (answered once QEMU
/// realized the device); to a stopped VM it is a cold attach (extension):
/// recorded and plugged at every start.
#[utoipa::path(post, path = "/disks/{id}/attach", params(("id" = String, Path, description = "The disk id")), request_body = AttachRequest, tag = "disks",
    responses((status = 200, body = DiskActionResponse),
        (status = 400, body = ErrorBody, description = "already attached, no free slot, QEMU refused, or `vm_id is required`"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn attach(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<AttachRequest>,
) -> Result<Json<DiskActionResponse>, ApiError> {
    let vm = req.vm()?;
    let disk = app.service.attach_disk(&id, &vm).await?;
    Ok(Json(DiskActionResponse {
        status: "attached",
        disk: DiskResponse::from(&disk),
    }))
}

/// Detach a disk: unplugged from a running VM once the guest released it
/// (bounded by VMAN_DETACH_TIMEOUT), only recorded otherwise.
#[utoipa::path(post, path = "/disks/{id}/detach", params(("id" = String, Path, description = "The disk id")), tag = "disks",
    responses((status = 200, body = DiskActionResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn detach(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<DiskActionResponse>, ApiError> {
    let disk = app.service.detach_disk(&id).await?;
    Ok(Json(DiskActionResponse {
        status: "detached",
        disk: DiskResponse::from(&disk),
    }))
}

/// Grow a disk (online when attached to a running VM); never shrinks.
#[utoipa::path(post, path = "/disks/{id}/resize", params(("id" = String, Path, description = "The disk id")), request_body = ResizeRequest, tag = "disks",
    responses((status = 200, body = DiskResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn resize(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<ResizeRequest>,
) -> Result<Json<DiskResponse>, ApiError> {
    let size = parse_size(req.size)?;
    let disk = app.service.resize_disk(&id, size).await?;
    Ok(Json(DiskResponse::from(&disk)))
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, delete))
        .routes(routes!(attach))
        .routes(routes!(detach))
        .routes(routes!(resize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u64, mount: Option<&str>, name: Option<&str>) -> DiskRequest {
        DiskRequest {
            size,
            mount_point: mount.map(str::to_owned),
            name: name.map(str::to_owned),
        }
    }

    #[test]
    fn inputs_are_checked() {
        assert_eq!(req(0, None, None).parse().expect_err("0").field, "size");
        assert_eq!(
            req(MAX_DISK_GB + 1, None, None)
                .parse()
                .expect_err("big")
                .field,
            "size"
        );
        assert_eq!(
            req(1, Some("data"), None)
                .parse()
                .expect_err("relative")
                .field,
            "mount_point"
        );
        let long = format!("/{}", "a".repeat(MAX_MOUNT_POINT));
        assert_eq!(
            req(1, Some(&long), None).parse().expect_err("long").field,
            "mount_point"
        );
        assert_eq!(
            req(1, None, Some("../x")).parse().expect_err("name").field,
            "name"
        );
        let ok = req(2, Some("/mnt/data"), Some("data-1"))
            .parse()
            .expect("valid");
        assert_eq!(
            (ok.size_gb, ok.id.map(|n| n.to_string())),
            (2, Some("data-1".into()))
        );
    }
}
