//! /vms: wire types, parsing into `CreateVm`, and the CRUD routes.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::templates::TemplateResponse;
use super::AppState;
use crate::model::{mac_for, Invalid, Name, NetworkMode, PortForward, RootDiskSource, Vm, VmState};
use crate::service::CreateVm;
use crate::sync::LockExt;

/// Body of POST /vms.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VmRequest {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub template_name: String,
    /// The VM id; a UUID v4 is generated when absent.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub name: Option<String>,
    /// Explicit root disk, used as is (extension; only inside VMAN_IMAGE_DIRS).
    pub qcow2_path: Option<String>,
    /// Image copied instead of the default boot disk (extension; same rule).
    pub boot_disk: Option<String>,
    /// The VM's network; without it `VMAN_NETWORK_MODE` (default `user`).
    pub network: Option<NetworkRequest>,
}

/// `network` of POST /vms.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// `user` (rootless, port forwards; guest 22 gets a host port),
    /// `bridge` (root only) or `none` (no NIC).
    pub mode: NetworkMode,
}

/// `network` of a VM.
#[derive(Debug, Serialize, ToSchema)]
pub struct NetworkResponse {
    pub mode: NetworkMode,
    /// Stable, derived from the VM id.
    pub mac: String,
    /// The guest's address while the VM runs (user mode); a bridge VM's
    /// allocated address, also while it is stopped.
    pub local_ip: Option<String>,
    /// Port forwards (user mode); guest 22 is forwarded from the first.
    pub ports: Vec<PortForward>,
}

/// Longest accepted disk path; longer is not a path anyone means.
const MAX_PATH_LEN: usize = 4096;

fn parse_path(field: &'static str, raw: Option<String>) -> Result<Option<String>, Invalid> {
    match raw {
        None => Ok(None),
        Some(p) if p.is_empty() || p.len() > MAX_PATH_LEN || p.contains('\0') => {
            Err(Invalid::new(field, "must be a non-empty file path"))
        }
        Some(p) => Ok(Some(p)),
    }
}

impl VmRequest {
    pub fn parse(self) -> Result<CreateVm, Invalid> {
        let template_name = Name::parse("template_name", &self.template_name)?;
        let id = self.name.map(|n| Name::parse("name", &n)).transpose()?;
        let qcow2_path = parse_path("qcow2_path", self.qcow2_path)?;
        let boot_disk = parse_path("boot_disk", self.boot_disk)?;
        if qcow2_path.is_some() && boot_disk.is_some() {
            return Err(Invalid::new(
                "boot_disk",
                "give either qcow2_path (used as is) or boot_disk (copied), not both",
            ));
        }
        Ok(CreateVm {
            template_name,
            id,
            qcow2_path,
            boot_disk,
            network: self.network.map(|n| n.mode),
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RootDisk {
    /// Where the root disk came from at the last start.
    pub source: RootDiskSource,
    pub path: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmResponse {
    pub id: String,
    pub vm_template: TemplateResponse,
    pub state: VmState,
    pub local_ip: Option<String>,
    pub root_disk: Option<RootDisk>,
    pub qcow2_path: Option<String>,
    pub boot_disk: Option<String>,
    pub pid: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub network: NetworkResponse,
    /// When the guest last fetched its meta-data from the metadata service
    /// (null: never).
    pub metadata_fetched_at: Option<String>,
    /// While a start is making the root disk (copy, conversion): how far it
    /// is (extension); null otherwise.
    pub provisioning: Option<ProvisioningResponse>,
}

/// `provisioning` of a VM whose start is making its root disk.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProvisioningResponse {
    /// reflink, copy_file_range, read_write, convert, overlay or empty.
    pub method: &'static str,
    /// Bytes done: a copy's offset in the source file (holes count as done,
    /// they are skipped); for convert, qemu-img's percentage of the total.
    pub bytes_done: u64,
    /// A copy: the source file's length; convert: the allocated size of the
    /// source's files; overlay and empty: 0.
    pub bytes_total: u64,
}

impl VmResponse {
    /// The VM as stored, with the progress of a start under way.
    fn with_progress(vm: &Vm, service: &crate::service::Service) -> Self {
        let mut wire = Self::from(vm);
        wire.provisioning = service.provisioning(&vm.id).map(|p| ProvisioningResponse {
            method: p.method,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
        });
        wire
    }
}

impl From<&Vm> for VmResponse {
    fn from(vm: &Vm) -> Self {
        let root_disk = match (&vm.root_disk_source, &vm.root_disk_path) {
            (Some(source), Some(path)) => Some(RootDisk {
                source: *source,
                path: path.clone(),
                virtual_size: vm.root_disk_size.unwrap_or(0),
            }),
            _ => None,
        };
        // A user-mode guest's address is only true while it runs; a bridge
        // VM's is the one allocated to it (leased by DHCP at every start).
        let local_ip = vm
            .local_ip
            .clone()
            .filter(|_| vm.state == VmState::Running || vm.network_mode == NetworkMode::Bridge);
        Self {
            id: vm.id.to_string(),
            vm_template: TemplateResponse::from(&vm.template),
            state: vm.state,
            local_ip: local_ip.clone(),
            root_disk,
            qcow2_path: vm.qcow2_path.clone(),
            boot_disk: vm.boot_disk.clone(),
            pid: vm.pid,
            last_error: vm.last_error.clone(),
            created_at: vm.created_at.clone(),
            updated_at: vm.updated_at.clone(),
            network: NetworkResponse {
                mode: vm.network_mode,
                mac: mac_for(vm.id.as_str()),
                local_ip,
                ports: vm.ports.clone(),
            },
            metadata_fetched_at: vm.metadata_fetched_at.clone(),
            provisioning: None,
        }
    }
}

/// Create a VM (state `stopped`).
#[utoipa::path(post, path = "/vms", request_body = VmRequest, tag = "vms",
    responses((status = 201, body = VmResponse), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Body(req): Body<VmRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let input = req.parse()?;
    let vm = app.service.create_vm(input).await?;
    Ok((StatusCode::CREATED, Json(VmResponse::from(&vm))))
}

/// Serialised answers of GET /vms by state filter, with the data generation
/// they were made from. Dashboards poll this list; while nothing changes,
/// the answer is the same bytes.
#[derive(Default)]
pub struct ListCache(std::sync::Mutex<HashMap<Option<VmState>, (u64, Bytes)>>);

impl ListCache {
    fn get(&self, state: Option<VmState>, generation: u64) -> Option<Bytes> {
        let map = self.0.lock_or_recover();
        map.get(&state)
            .filter(|(g, _)| *g == generation)
            .map(|(_, b)| b.clone())
    }

    fn put(&self, state: Option<VmState>, generation: u64, body: Bytes) {
        let mut map = self.0.lock_or_recover();
        map.insert(state, (generation, body));
    }
}

/// List VMs, optionally only those in one state.
#[utoipa::path(get, path = "/vms", tag = "vms",
    params(("state" = Option<VmState>, Query, description = "running, stopped or error")),
    responses((status = 200, body = [VmResponse]), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let state = query
        .get("state")
        .map(|s| {
            VmState::parse(s)
                .ok_or_else(|| ApiError::invalid("state", "must be one of running, stopped, error"))
        })
        .transpose()?;
    // While a start makes a root disk, the list carries its progress,
    // which is not in the store: made fresh, not cached.
    if app.service.provisioning_any() {
        let vms = app.service.list_vms(state)?;
        let wire: Vec<VmResponse> = vms
            .iter()
            .map(|vm| VmResponse::with_progress(vm, &app.service))
            .collect();
        return Ok(Json(wire).into_response());
    }
    // Read the generation first: the list is then at least that new.
    let generation = app.service.data_generation();
    let body = match app.vm_list.get(state, generation) {
        Some(body) => body,
        None => {
            let vms = app.service.list_vms(state)?;
            let wire: Vec<VmResponse> = vms.iter().map(VmResponse::from).collect();
            let body = Bytes::from(serde_json::to_vec(&wire).map_err(|e| {
                ApiError::from(crate::service::ServiceError::Internal(e.to_string()))
            })?);
            app.vm_list.put(state, generation, body.clone());
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// One VM.
#[utoipa::path(get, path = "/vms/{vm_id}", params(("vm_id" = String, Path, description = "The VM id")), tag = "vms",
    responses((status = 200, body = VmResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<VmResponse>, ApiError> {
    let vm = app.service.get_vm(&id)?;
    Ok(Json(VmResponse::with_progress(&vm, &app.service)))
}

/// Delete a VM (stopping it first when it runs) and its folder.
#[utoipa::path(delete, path = "/vms/{vm_id}", params(("vm_id" = String, Path, description = "The VM id")), tag = "vms",
    responses((status = 204), (status = 400, description = "linked clones are built on the VM (`in_use`)", body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<StatusCode, ApiError> {
    app.service.delete_vm(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, delete))
}
