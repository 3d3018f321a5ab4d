//! Extractors that turn every malformed input into an `ApiError` with a
//! `detail` naming the field, instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::model::Name;

/// A JSON body. Syntax errors are 400, shape errors (missing field, wrong
/// type, out of range) are 422, both with the path of the offending field.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(len) = declared.filter(|n| *n > super::MAX_BODY_BYTES as u64) {
            // Read what the client sends anyway (up to a cap), so it gets our
            // answer instead of a reset connection.
            if len <= DRAIN_LIMIT as u64 {
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_LIMIT).await;
            }
            return Err(too_large());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("Cannot read request body: {e}"),
                )
            }
        })?;
        parse_json(&bytes).map(Body)
    }
}

/// Bodies up to this size are read and dropped before a 413.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "Request body is too large (at most {} bytes)",
            super::MAX_BODY_BYTES
        ),
    )
}

/// Parses JSON with the path of the failing field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde lets a struct be read from an array; the contract wants objects.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() || first == Some(&b'[') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "body: a JSON object is required",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        json_error(&path, e.inner())
    })?;
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, inner: &serde_json::Error) -> ApiError {
    let message = strip_position(&inner.to_string());
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("Malformed JSON: {message}"),
        ),
        _ if path == "." => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("body: {message}"),
        ),
        _ => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{path}: {message}"),
        ),
    }
}

/// serde_json appends " at line 1 column 7", which helps nobody here.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The `{name}`/`{vm_id}` path segment, parsed as a `Name`. A segment that
/// cannot be a name (not even UTF-8) cannot exist, so it is a 404 like any
/// unknown id.
pub struct PathName(pub Name);

impl<S: Send + Sync> FromRequestParts<S> for PathName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not found"))?;
        Name::parse("id", &raw)
            .map(PathName)
            .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not found"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        cpu_count: u32,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<T>(br#"{"cpu_count": -1}"#).expect_err("negative");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.detail.starts_with("cpu_count:"), "{}", e.detail);
        let e = parse_json::<T>(br#"{}"#).expect_err("missing");
        assert!(e.detail.contains("cpu_count"), "{}", e.detail);
        let e = parse_json::<T>(br#"{"cpu_count": 1"#).expect_err("eof");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<T>(br#"{"cpu_count": 1} x"#).expect_err("trailing");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<T>(b"[1]").expect_err("array");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(parse_json::<T>(br#"{"cpu_count": 2}"#).is_ok());
    }
}
