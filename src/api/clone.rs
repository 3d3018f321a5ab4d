//! POST /vms/{vm_id}/clone: a new stopped VM with a copy of the source's
//! disks (full, or linked on a snapshot of the source); its wire type and
//! parsing. The rules are `service::clone`'s.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::vms::VmResponse;
use super::AppState;
use crate::cluster::placement;
use crate::model::{Invalid, Name};
use crate::service::CloneVm;

/// Body of POST /vms/{vm_id}/clone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The new VM's id (the name rule; not taken).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub name: String,
    /// `true`: the root disk is a qcow2 overlay on a new snapshot of the
    /// source (`clone-<name>`, kept while the clone exists); `false`
    /// (default): an independent copy. Data disks are always copied.
    #[serde(default)]
    pub linked: bool,
}

impl CloneRequest {
    pub fn parse(self) -> Result<CloneVm, Invalid> {
        Ok(CloneVm {
            name: Name::parse("name", &self.name)?,
            linked: self.linked,
        })
    }
}

/// Clone a stopped VM: a new stopped VM with the same template, network
/// mode (new MAC and ports), metadata without the hostname, and a copy of
/// each disk (reflink when the filesystem can).
#[utoipa::path(post, path = "/vms/{vm_id}/clone", params(("vm_id" = String, Path, description = "The VM to clone")),
    request_body = CloneRequest, tag = "vms",
    responses((status = 201, body = VmResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub async fn clone(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<CloneRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let input = req.parse()?;
    let Some(cluster) = app.cluster.clone() else {
        let vm = app.service.clone_vm(&id, input).await?;
        return Ok((StatusCode::CREATED, Json(VmResponse::from(&vm))));
    };
    // Cluster mode (the request reached the source's own node): the clone
    // lives here with its disks, so it is placed here first (the cluster-
    // wide name and this node's memory in one etcd transaction), and the
    // placement is given back if the clone fails.
    let ram = app.service.get_vm(&id)?.template.ram_mib;
    let new_id = input.name.clone();
    placement::place(&cluster, new_id.as_str(), ram, Some(&cluster.node)).await?;
    match app.service.clone_vm(&id, input).await {
        Ok(vm) => {
            super::cluster::publish(&app, &cluster, new_id.as_str()).await;
            Ok((StatusCode::CREATED, Json(VmResponse::from(&vm))))
        }
        Err(e) => {
            if let Err(r) = placement::release(&cluster, new_id.as_str()).await {
                tracing::warn!("cluster: clone {new_id} failed and its placement stays: {r}");
            }
            Err(e.into())
        }
    }
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(clone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_checks_the_name_and_defaults_to_a_full_clone() {
        let ok: CloneRequest = serde_json::from_str(r#"{"name":"b"}"#).unwrap();
        let c = ok.parse().unwrap();
        assert_eq!((c.name.as_str(), c.linked), ("b", false));
        let bad: CloneRequest = serde_json::from_str(r#"{"name":"../x"}"#).unwrap();
        assert!(bad.parse().is_err());
        assert!(serde_json::from_str::<CloneRequest>(r#"{"name":"b","linked":"yes"}"#).is_err());
        assert!(serde_json::from_str::<CloneRequest>(r#"{"name":"b","extra":1}"#).is_err());
    }
}
