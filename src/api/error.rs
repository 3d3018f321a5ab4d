//! The one place where errors become HTTP statuses. Every error body is
//! `{"detail": "...", "code": "..."}`; internal details go to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::model::Invalid;
use crate::service::{Reason, ServiceError};

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable message.
    pub detail: String,
    /// Stable machine-readable code; clients branch on it (the detail is
    /// for people). Refusals (400): `already_exists`, `template_missing`,
    /// `in_use`, `already_running`, `not_running`, `adoption_pending`,
    /// `unkillable`, `no_memory`, `qemu_failed`, `console_not_connected`,
    /// `console_write_failed`, `too_many_viewers`, `image_refused`, `image_failed`,
    /// `disk_file_refused`, `disk_attached`, `not_attached`, `disk_busy`,
    /// `no_free_slot`, `cannot_shrink`, `guest_did_not_release`,
    /// `hotplug_failed`, `invalid_transition`, `port_in_use`,
    /// `network_unavailable`, `not_user_network`, `network_failed`,
    /// `subnet_full`, `bridge_failed`, `not_stopped`, `no_root_disk`,
    /// `too_many_snapshots`, `snapshot_in_use`, `snapshot_failed`, `disk_in_snapshot`,
    /// `unknown_node`, `migration_refused`, `transfer_refused`,
    /// `placement_conflict`. Others: `invalid` (422), `required` (400),
    /// `malformed_json` (400), `bad_body` (400), `not_found` (404),
    /// `method_not_allowed` (405), `unauthorized` (401), `host_not_allowed`
    /// (403), `origin_not_allowed` (403), `forbidden` (403), `too_large` (413),
    /// `unsupported_media_type` (415), `insufficient_storage` (507),
    /// `internal` (500), `database_damaged` (500), `upgrade_required` (426).
    /// Cluster mode: `cluster_unavailable` (503), `node_offline` (503),
    /// `node_unreachable` (503), `node_unavailable` (400),
    /// `placement_changed` (409), `cluster_token`
    /// (401), `not_clustered` (404).
    /// See docs/errors.md.
    pub code: &'static str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Invalid::new(field, message).into()
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
    }
}

/// The status and `code` of each service error: the one place that decides
/// them (documented in docs/errors.md, unit-tested below).
pub fn status_of(e: &ServiceError) -> (StatusCode, &'static str) {
    match e {
        ServiceError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        // Every refusal is a 400, as the first VMAN answered them.
        ServiceError::Refused(r) => (StatusCode::BAD_REQUEST, code_of(&r.reason)),
        ServiceError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ServiceError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
        ServiceError::DatabaseDamaged(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_damaged"),
    }
}

/// The stable code of each refusal reason: clients branch on it, so a code,
/// once published, never changes.
fn code_of(reason: &Reason) -> &'static str {
    match reason {
        Reason::AlreadyExists => "already_exists",
        Reason::TemplateMissing => "template_missing",
        Reason::InUse => "in_use",
        Reason::AlreadyRunning(_) => "already_running",
        Reason::NotRunning => "not_running",
        Reason::AdoptionPending => "adoption_pending",
        Reason::Unkillable => "unkillable",
        Reason::NoMemory => "no_memory",
        Reason::QemuFailed(_) => "qemu_failed",
        Reason::ConsoleNotConnected => "console_not_connected",
        Reason::TooManyViewers => "too_many_viewers",
        Reason::ConsoleWriteFailed(_) => "console_write_failed",
        Reason::ImageRefused(_) => "image_refused",
        Reason::ImageFailed(_) => "image_failed",
        Reason::DiskFileRefused(_) => "disk_file_refused",
        Reason::DiskAttached => "disk_attached",
        Reason::NotAttached => "not_attached",
        Reason::DiskBusy => "disk_busy",
        Reason::NoFreeSlot => "no_free_slot",
        Reason::CannotShrink => "cannot_shrink",
        Reason::GuestDidNotRelease => "guest_did_not_release",
        Reason::HotplugFailed(_) => "hotplug_failed",
        Reason::InvalidTransition => "invalid_transition",
        Reason::PortInUse => "port_in_use",
        Reason::NetworkUnavailable => "network_unavailable",
        Reason::NotUserNetwork => "not_user_network",
        Reason::NetworkFailed => "network_failed",
        Reason::SubnetFull => "subnet_full",
        Reason::BridgeFailed(_) => "bridge_failed",
        Reason::NotStopped => "not_stopped",
        Reason::NoRootDisk => "no_root_disk",
        Reason::TooManySnapshots => "too_many_snapshots",
        Reason::SnapshotInUse => "snapshot_in_use",
        Reason::SnapshotFailed(_) => "snapshot_failed",
        Reason::DiskInSnapshot => "disk_in_snapshot",
        Reason::UnknownNode => "unknown_node",
        Reason::MigrationRefused => "migration_refused",
        Reason::TransferRefused => "transfer_refused",
        Reason::PlacementConflict => "placement_conflict",
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let (status, code) = status_of(&e);
        let detail = match &e {
            ServiceError::Internal(msg) => {
                tracing::error!("internal error: {msg}");
                "Internal error; see the vman log".to_owned()
            }
            ServiceError::DatabaseDamaged(msg) => {
                tracing::error!("database damaged: {msg}");
                "The database is damaged; see /health and the vman log".to_owned()
            }
            other => other.to_string(),
        };
        Self::new(status, code, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let close = self.status == StatusCode::PAYLOAD_TOO_LARGE;
        let mut resp = (
            self.status,
            Json(ErrorBody {
                detail: self.detail,
                code: self.code,
            }),
        )
            .into_response();
        if close {
            // The rest of an oversized body may be unread: do not reuse the
            // connection.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_error_has_its_status() {
        let cases = [
            (
                ServiceError::Invalid(Invalid::new("f", "m")),
                422,
                "invalid",
            ),
            (ServiceError::NotFound("VM"), 404, "not_found"),
            (Reason::NotRunning.refuse("no"), 400, "not_running"),
            (ServiceError::Internal("boom".into()), 500, "internal"),
            (
                ServiceError::NoSpace("full".into()),
                507,
                "insufficient_storage",
            ),
            (
                ServiceError::DatabaseDamaged("page 3".into()),
                500,
                "database_damaged",
            ),
        ];
        for (e, want, code) in cases {
            assert_eq!(
                status_of(&e),
                (StatusCode::from_u16(want).unwrap(), code),
                "{e:?}"
            );
        }
    }

    /// The code of every reason, in the order of `every_reason()`. These
    /// are published (docs/errors.md): never change one.
    const REFUSAL_CODES: [&str; 41] = [
        "already_exists",
        "template_missing",
        "in_use",
        "already_running",
        "already_running",
        "not_running",
        "adoption_pending",
        "unkillable",
        "no_memory",
        "qemu_failed",
        "console_not_connected",
        "console_write_failed",
        "too_many_viewers",
        "image_refused",
        "image_failed",
        "disk_file_refused",
        "disk_file_refused",
        "disk_attached",
        "not_attached",
        "disk_busy",
        "no_free_slot",
        "cannot_shrink",
        "guest_did_not_release",
        "hotplug_failed",
        "invalid_transition",
        "port_in_use",
        "network_unavailable",
        "not_user_network",
        "network_failed",
        "subnet_full",
        "bridge_failed",
        "not_stopped",
        "no_root_disk",
        "too_many_snapshots",
        "snapshot_in_use",
        "snapshot_failed",
        "disk_in_snapshot",
        "unknown_node",
        "migration_refused",
        "transfer_refused",
        "placement_conflict",
    ];

    #[test]
    fn every_refusal_is_a_400_with_its_own_code() {
        let reasons = crate::service::every_reason();
        assert_eq!(reasons.len(), REFUSAL_CODES.len());
        for (reason, want) in reasons.into_iter().zip(REFUSAL_CODES) {
            let e = reason.refuse("detail text");
            assert_eq!(status_of(&e), (StatusCode::BAD_REQUEST, want), "{e:?}");
            let api = ApiError::from(e);
            assert_eq!((api.code, api.detail.as_str()), (want, "detail text"));
        }
        // Two reasons never share a code (variants of one reason, listed
        // next to each other, may).
        let mut distinct: Vec<&str> = REFUSAL_CODES.to_vec();
        distinct.dedup();
        let mut sorted = distinct.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            distinct.len(),
            "a code is used by two reasons"
        );
    }

    /// Every code vman answers with is documented in the README's error
    /// table (docs/errors.md) and in the OpenAPI `ErrorBody.code`.
    #[test]
    fn every_code_is_documented() {
        let docs = include_str!("../../docs/errors.md");
        let schema =
            serde_json::to_string(&<ErrorBody as utoipa::PartialSchema>::schema()).expect("schema");
        let others = [
            "invalid",
            "required",
            "malformed_json",
            "bad_body",
            "not_found",
            "method_not_allowed",
            "unauthorized",
            "forbidden",
            "host_not_allowed",
            "origin_not_allowed",
            "too_large",
            "unsupported_media_type",
            "insufficient_storage",
            "internal",
            "database_damaged",
            "upgrade_required",
            "cluster_unavailable",
            "node_offline",
            "node_unreachable",
            "node_unavailable",
            "placement_changed",
            "cluster_token",
            "not_clustered",
        ];
        for code in REFUSAL_CODES.iter().chain(&others) {
            assert!(
                docs.contains(&format!("| `{code}` |")),
                "{code} not in docs/errors.md"
            );
            assert!(
                schema.contains(&format!("`{code}`")),
                "{code} not in ErrorBody"
            );
        }
    }

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let e: ApiError = ServiceError::Internal("/secret/path failed".into()).into();
        assert!(!e.detail.contains("/secret"));
    }
}
