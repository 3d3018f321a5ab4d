//! GET /network/config: the bridge network as the first VMAN showed it.

use axum::extract::State;
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::ApiError;
use super::AppState;
use crate::service::NetworkConfig;

/// The bridge network: name, subnet, gateway, VLAN, DNS, how many addresses
/// are allocated and free; `{"status": "not_configured", "reason"}` on a
/// host that cannot run bridge VMs.
#[utoipa::path(get, path = "/network/config", tag = "system",
    responses((status = 200, body = NetworkConfig)))]
pub async fn network_config(State(app): State<AppState>) -> Result<Json<NetworkConfig>, ApiError> {
    Ok(Json(app.service.network_config()?))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(network_config))
}
