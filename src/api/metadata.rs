//! /vms/{vm_id}/metadata: cloud-init metadata of a VM.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{Invalid, Metadata, MetadataPatch, Name};

/// Body of PUT /vms/{vm_id}/metadata; only the fields given change.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MetadataRequest {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetadataResponse {
    pub vm_id: String,
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl MetadataResponse {
    fn new(vm_id: &Name, m: Metadata) -> Self {
        Self {
            vm_id: vm_id.to_string(),
            hostname: m.hostname,
            user_data: m.user_data,
            ssh_keys: m.ssh_keys,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

const MAX_USER_DATA: usize = 256 * 1024;
const MAX_SSH_KEY: usize = 16 * 1024;
const MAX_SSH_KEYS: usize = 100;

/// An RFC 1123 host name: dot-separated labels of letters, digits and
/// hyphens, 1-63 characters each, 253 in all.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl MetadataRequest {
    pub fn parse(self) -> Result<MetadataPatch, Invalid> {
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(Invalid::new(
                    "hostname",
                    "must be a host name: labels of letters, digits and '-', separated by dots",
                ));
            }
        }
        if self
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA)
        {
            return Err(Invalid::new(
                "user_data",
                format!("must be at most {MAX_USER_DATA} bytes"),
            ));
        }
        if let Some(keys) = &self.ssh_keys {
            if keys.len() > MAX_SSH_KEYS {
                return Err(Invalid::new(
                    "ssh_keys",
                    format!("at most {MAX_SSH_KEYS} keys"),
                ));
            }
            if keys
                .iter()
                .any(|k| k.trim().is_empty() || k.len() > MAX_SSH_KEY || k.contains(['\n', '\r']))
            {
                return Err(Invalid::new(
                    "ssh_keys",
                    "each key must be one non-empty line of at most 16 KiB",
                ));
            }
        }
        Ok(MetadataPatch {
            hostname: self.hostname,
            user_data: self.user_data,
            ssh_keys: self.ssh_keys,
        })
    }
}

/// Set metadata fields.
#[utoipa::path(put, path = "/vms/{vm_id}/metadata", request_body = MetadataRequest, tag = "metadata",
    responses((status = 200, body = MetadataResponse), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put(
    State(app): State<AppState>,
    PathName(id): PathName,
    Body(req): Body<MetadataRequest>,
) -> Result<Json<MetadataResponse>, ApiError> {
    let patch = req.parse()?;
    let m = app.service.put_metadata(&id, patch)?;
    Ok(Json(MetadataResponse::new(&id, m)))
}

/// Read metadata (nulls when never set).
#[utoipa::path(get, path = "/vms/{vm_id}/metadata", tag = "metadata",
    responses((status = 200, body = MetadataResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<MetadataResponse>, ApiError> {
    let m = app.service.get_metadata(&id)?;
    Ok(Json(MetadataResponse::new(&id, m)))
}

/// Forget the metadata.
#[utoipa::path(delete, path = "/vms/{vm_id}/metadata", tag = "metadata",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<StatusCode, ApiError> {
    app.service.delete_metadata(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get, put, delete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["a", "web-1", "a.b.example", &"x".repeat(63)] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a_b", &"x".repeat(64)] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }
}
