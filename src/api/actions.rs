//! /vms/{vm_id}/actions/* and the console.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{parse_json, Body, PathName};
use super::AppState;
use crate::model::StopMethod;

/// Optional body of stop and restart.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StopRequest {
    /// Skip the ACPI power button: QMP `quit`, then SIGKILL.
    #[serde(default)]
    pub force: bool,
}

/// Stop and restart take an optional body; an empty one means defaults.
fn stop_options(body: &Bytes) -> Result<StopRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(StopRequest::default())
    } else {
        parse_json(body)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionResponse {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StopResponse {
    pub status: &'static str,
    /// How QEMU ended: acpi, quit, killed or already_exited.
    pub method: StopMethod,
    pub elapsed_ms: u64,
}

/// Start a VM; answers once QEMU runs and QMP answered.
#[utoipa::path(post, path = "/vms/{vm_id}/actions/start", params(("vm_id" = String, Path, description = "The VM id")), tag = "vms",
    responses((status = 202, body = ActionResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn start(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<(StatusCode, Json<ActionResponse>), ApiError> {
    app.service.start_vm(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionResponse { status: "started" }),
    ))
}

/// Stop a VM: ACPI power-down, then QMP quit, then SIGKILL.
#[utoipa::path(post, path = "/vms/{vm_id}/actions/stop", params(("vm_id" = String, Path, description = "The VM id")), request_body(content = Option<StopRequest>), tag = "vms",
    responses((status = 202, body = StopResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn stop(
    State(app): State<AppState>,
    PathName(id): PathName,
    body: Bytes,
) -> Result<(StatusCode, Json<StopResponse>), ApiError> {
    let opts = stop_options(&body)?;
    let report = app.service.stop_vm(&id, opts.force).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(StopResponse {
            status: "stopped",
            method: report.method,
            elapsed_ms: report.elapsed.as_millis() as u64,
        }),
    ))
}

/// Stop (when running), then start.
#[utoipa::path(post, path = "/vms/{vm_id}/actions/restart", params(("vm_id" = String, Path, description = "The VM id")), request_body(content = Option<StopRequest>), tag = "vms",
    responses((status = 202, body = ActionResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn restart(
    State(app): State<AppState>,
    PathName(id): PathName,
    body: Bytes,
) -> Result<(StatusCode, Json<ActionResponse>), ApiError> {
    let opts = stop_options(&body)?;
    app.service.restart_vm(&id, opts.force).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionResponse {
            status: "restarted",
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsoleResponse {
    pub vm_id: String,
    /// The last 50 kB of the serial console.
    pub console: String,
    /// Bytes returned in `console`.
    pub size: u64,
    /// Bytes kept on disk.
    pub file_size: u64,
    pub message: Option<String>,
}

/// The tail of the serial console (also after the VM stopped).
#[utoipa::path(get, path = "/vms/{vm_id}/console", params(("vm_id" = String, Path, description = "The VM id")), tag = "vms",
    responses((status = 200, body = ConsoleResponse), (status = 404, body = ErrorBody)))]
pub async fn console(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<ConsoleResponse>, ApiError> {
    let (tail, file_size) = app.service.console(&id)?;
    let message = if file_size == 0 {
        Some("No console output yet".to_owned())
    } else if file_size > tail.len() as u64 {
        Some(format!("Showing the last {} bytes", tail.len()))
    } else {
        None
    };
    Ok(Json(ConsoleResponse {
        vm_id: id.to_string(),
        size: tail.len() as u64,
        console: String::from_utf8_lossy(&tail).into_owned(),
        file_size,
        message,
    }))
}

/// Text to type into the serial console (extension).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ConsoleInput {
    pub data: String,
}

/// Type into the serial console of a running VM.
#[utoipa::path(post, path = "/vms/{vm_id}/console", params(("vm_id" = String, Path, description = "The VM id")), request_body = ConsoleInput, tag = "vms",
    responses((status = 200, body = ActionResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn console_input(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(input): Body<ConsoleInput>,
) -> Result<Json<ActionResponse>, ApiError> {
    if input.data.len() > 64 * 1024 {
        return Err(ApiError::invalid("data", "at most 64 KiB at once"));
    }
    app.service
        .console_input(&id, input.data.as_bytes())
        .await?;
    Ok(Json(ActionResponse { status: "sent" }))
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(restart))
        .routes(routes!(console, console_input))
}
