//! The one place where errors become HTTP statuses. Every error body is
//! `{"detail": "...", "code": "..."}`; internal details go to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::model::Invalid;
use crate::service::ServiceError;

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
    /// Stable machine-readable code.
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

/// The status of each service error. Kept tiny and unit-tested.
pub fn status_of(e: &ServiceError) -> (StatusCode, &'static str) {
    match e {
        ServiceError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ServiceError::Rejected(_) => (StatusCode::BAD_REQUEST, "rejected"),
        ServiceError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ServiceError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
        ServiceError::DatabaseDamaged(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_damaged"),
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
            (ServiceError::Invalid(Invalid::new("f", "m")), 422),
            (ServiceError::NotFound("VM"), 404),
            (ServiceError::Rejected("no".into()), 400),
            (ServiceError::Internal("boom".into()), 500),
            (ServiceError::NoSpace("full".into()), 507),
            (ServiceError::DatabaseDamaged("page 3".into()), 500),
        ];
        for (e, want) in cases {
            assert_eq!(status_of(&e).0.as_u16(), want, "{e:?}");
        }
    }

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let e: ApiError = ServiceError::Internal("/secret/path failed".into()).into();
        assert!(!e.detail.contains("/secret"));
    }
}
