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
    pub ssh_keys: Option<SshKeys>,
}

/// SSH public keys: one string with one key per line (the first VMAN's
/// form), or an array of keys (extension). Blank lines are dropped.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SshKeys {
    /// One string, one key per line.
    Lines(String),
    /// One key per element, each one line (extension).
    List(Vec<String>),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetadataResponse {
    pub vm_id: String,
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    /// The keys, one per line (`\n`-separated), as the first VMAN answered.
    pub ssh_keys: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl MetadataResponse {
    fn new(vm_id: &Name, m: Metadata) -> Self {
        Self {
            vm_id: vm_id.to_string(),
            hostname: m.hostname,
            user_data: m.user_data,
            ssh_keys: m.ssh_keys.map(|k| k.join("\n")),
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
        let ssh_keys = self.ssh_keys.map(|k| match k {
            SshKeys::Lines(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
            SshKeys::List(keys) => keys,
        });
        if let Some(keys) = &ssh_keys {
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
                    "each key must be one non-empty line of at most 16 KiB \
                     (give one string with a key per line, or an array of keys)",
                ));
            }
        }
        Ok(MetadataPatch {
            hostname: self.hostname,
            user_data: self.user_data,
            ssh_keys,
        })
    }
}

/// Set metadata fields.
#[utoipa::path(put, path = "/vms/{vm_id}/metadata", params(("vm_id" = String, Path, description = "The VM id")), request_body = MetadataRequest, tag = "metadata",
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
#[utoipa::path(get, path = "/vms/{vm_id}/metadata", params(("vm_id" = String, Path, description = "The VM id")), tag = "metadata",
    responses((status = 200, body = MetadataResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<MetadataResponse>, ApiError> {
    let m = app.service.get_metadata(&id)?;
    Ok(Json(MetadataResponse::new(&id, m)))
}

/// Forget the metadata.
#[utoipa::path(delete, path = "/vms/{vm_id}/metadata", params(("vm_id" = String, Path, description = "The VM id")), tag = "metadata",
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

    fn keys_of(json: &str) -> Result<Option<Vec<String>>, Invalid> {
        let req: MetadataRequest = serde_json::from_str(json).expect("json");
        req.parse().map(|p| p.ssh_keys)
    }

    #[test]
    fn ssh_keys_are_lines_of_a_string_or_an_array() {
        assert_eq!(
            keys_of(r#"{"ssh_keys": "ssh-rsa A a@b\r\n\n  ssh-ed25519 B c@d  \n"}"#),
            Ok(Some(vec![
                "ssh-rsa A a@b".into(),
                "ssh-ed25519 B c@d".into()
            ]))
        );
        assert_eq!(
            keys_of(r#"{"ssh_keys": ["ssh-rsa A", "ssh-ed25519 B"]}"#),
            Ok(Some(vec!["ssh-rsa A".into(), "ssh-ed25519 B".into()]))
        );
        assert_eq!(keys_of(r#"{"ssh_keys": ""}"#), Ok(Some(vec![])));
        assert_eq!(keys_of("{}"), Ok(None));
        assert_eq!(
            keys_of(r#"{"ssh_keys": ["a\nb"]}"#).map_err(|e| e.field),
            Err("ssh_keys")
        );
        let many = vec!["k"; MAX_SSH_KEYS + 1].join("\n");
        assert_eq!(
            keys_of(&serde_json::json!({ "ssh_keys": many }).to_string()).map_err(|e| e.field),
            Err("ssh_keys")
        );
    }

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
