//! /vms/{vm_id}/ports: port forwards of user-mode VMs (wire types, parsing
//! into `AddPort`, handlers and `router()`).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{Invalid, Name, PortForward, Protocol};
use crate::service::{AddPort, Applied};

/// Body of POST /vms/{vm_id}/ports.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// The port in the guest (1-65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: i64,
    /// The host port (1-65535); vman picks a free one when absent.
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: Option<i64>,
    /// `tcp` (default) or `udp`.
    pub protocol: Option<Protocol>,
}

fn port(field: &'static str, raw: i64) -> Result<u16, Invalid> {
    u16::try_from(raw)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| Invalid::new(field, "must be a port number from 1 to 65535"))
}

impl PortRequest {
    pub fn parse(self) -> Result<AddPort, Invalid> {
        Ok(AddPort {
            guest_port: port("guest_port", self.guest_port)?,
            host_port: self.host_port.map(|p| port("host_port", p)).transpose()?,
            protocol: self.protocol.unwrap_or(Protocol::Tcp),
        })
    }
}

/// When a change reaches the guest.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AppliedWire {
    /// The running VM has it already (slirp).
    Now,
    /// At the VM's next start (stopped VM, or the passt backend).
    NextStart,
}

impl From<Applied> for AppliedWire {
    fn from(a: Applied) -> Self {
        match a {
            Applied::Now => Self::Now,
            Applied::NextStart => Self::NextStart,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortResponse {
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
    pub host_address: String,
    pub applied: AppliedWire,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortDeleted {
    pub applied: AppliedWire,
}

/// Forward a host port to a guest port (user-mode VMs).
#[utoipa::path(post, path = "/vms/{vm_id}/ports", request_body = PortRequest,
    params(("vm_id" = String, Path, description = "The VM id")), tag = "network",
    responses((status = 201, body = PortResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn add(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<PortRequest>,
) -> Result<(StatusCode, Json<PortResponse>), ApiError> {
    let input = req.parse()?;
    let (p, applied) = app.service.add_port(&id, input).await?;
    Ok((
        StatusCode::CREATED,
        Json(PortResponse {
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: p.protocol,
            host_address: p.host_address,
            applied: applied.into(),
        }),
    ))
}

/// The VM's port forwards.
#[utoipa::path(get, path = "/vms/{vm_id}/ports",
    params(("vm_id" = String, Path, description = "The VM id")), tag = "network",
    responses((status = 200, body = [PortForward]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<Vec<PortForward>>, ApiError> {
    Ok(Json(app.service.list_ports(&id)?))
}

/// Remove a port forward.
#[utoipa::path(delete, path = "/vms/{vm_id}/ports/{host_port}",
    params(("vm_id" = String, Path, description = "The VM id"),
        ("host_port" = u16, Path, description = "The forwarded host port"),
        ("protocol" = Option<Protocol>, Query, description = "tcp or udp; needed only when the port has both")),
    tag = "network",
    responses((status = 200, body = PortDeleted), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path((vm, host_port)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PortDeleted>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "VM not found");
    let id = Name::parse("vm_id", &vm).map_err(|_| not_found())?;
    let host_port = host_port
        .parse::<i64>()
        .map_err(|_| Invalid::new("host_port", "must be a port number from 1 to 65535"))
        .and_then(|p| port("host_port", p))?;
    let protocol = query
        .get("protocol")
        .map(|p| Protocol::parse(p).ok_or_else(|| Invalid::new("protocol", "must be tcp or udp")))
        .transpose()?;
    let applied = app.service.delete_port(&id, host_port, protocol).await?;
    Ok(Json(PortDeleted {
        applied: applied.into(),
    }))
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add, list))
        .routes(routes!(delete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(guest: i64, host: Option<i64>) -> PortRequest {
        PortRequest {
            guest_port: guest,
            host_port: host,
            protocol: None,
        }
    }

    #[test]
    fn ports_outside_1_to_65535_are_refused_naming_the_field() {
        for bad in [0, -1, 65536, i64::MAX] {
            let e = req(bad, None).parse().expect_err("guest");
            assert_eq!(e.field, "guest_port");
            let e = req(80, Some(bad)).parse().expect_err("host");
            assert_eq!(e.field, "host_port");
        }
        let ok = req(65535, Some(1)).parse().expect("valid");
        assert_eq!((ok.guest_port, ok.host_port), (65535, Some(1)));
        assert_eq!(ok.protocol, Protocol::Tcp);
    }
}
