//! /templates: wire types, their parsing into `CreateTemplate`, and routes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, PathName};
use super::AppState;
use crate::model::{Invalid, Name, Template, MAX_CPUS, MAX_DISK_GB, MAX_RAM_MIB, MIN_RAM_MIB};
use crate::service::CreateTemplate;

/// Body of POST /templates. Exactly one of `ram_amount` (GiB) and `ram_mib`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TemplateRequest {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length = 63)]
    pub name: String,
    #[schema(minimum = 1, maximum = 512)]
    pub cpu_count: u64,
    /// Memory in GiB.
    #[schema(minimum = 1, maximum = 16384)]
    pub ram_amount: Option<u64>,
    /// Memory in MiB, for sizes below 1 GiB (extension).
    #[schema(minimum = 16, maximum = 16777216)]
    pub ram_mib: Option<u64>,
    /// Grow root disks to this size in GiB (2^30 bytes) after the copy
    /// (extension).
    #[schema(minimum = 1, maximum = 65536)]
    pub disk_size_gb: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateResponse {
    pub name: String,
    pub cpu_count: u32,
    /// Memory in GiB; a fraction for templates made with `ram_mib`.
    #[schema(value_type = f64)]
    pub ram_amount: serde_json::Number,
    pub ram_mib: u64,
    /// Root disk size in GiB (2^30 bytes), when the template sets one.
    pub disk_size_gb: Option<u64>,
    pub created_at: String,
}

impl From<&Template> for TemplateResponse {
    fn from(t: &Template) -> Self {
        let ram_amount = if t.ram_mib.is_multiple_of(1024) {
            serde_json::Number::from(t.ram_mib / 1024)
        } else {
            serde_json::Number::from_f64(t.ram_mib as f64 / 1024.0)
                .unwrap_or_else(|| serde_json::Number::from(0))
        };
        Self {
            name: t.name.to_string(),
            cpu_count: t.cpu_count,
            ram_amount,
            ram_mib: t.ram_mib,
            disk_size_gb: t.disk_size_gb,
            created_at: t.created_at.clone(),
        }
    }
}

impl TemplateRequest {
    pub fn parse(self) -> Result<CreateTemplate, Invalid> {
        let name = Name::parse("name", &self.name)?;
        let cpu_count = match u32::try_from(self.cpu_count) {
            Ok(n @ 1..=MAX_CPUS) => n,
            _ => {
                return Err(Invalid::new(
                    "cpu_count",
                    format!("must be between 1 and {MAX_CPUS}"),
                ))
            }
        };
        let ram_mib = match (self.ram_amount, self.ram_mib) {
            (Some(gib), None) => {
                if gib == 0 || gib > MAX_RAM_MIB / 1024 {
                    return Err(Invalid::new(
                        "ram_amount",
                        format!("must be between 1 and {} (GiB)", MAX_RAM_MIB / 1024),
                    ));
                }
                gib * 1024
            }
            (None, Some(mib)) => {
                if !(MIN_RAM_MIB..=MAX_RAM_MIB).contains(&mib) {
                    return Err(Invalid::new(
                        "ram_mib",
                        format!("must be between {MIN_RAM_MIB} and {MAX_RAM_MIB} (MiB)"),
                    ));
                }
                mib
            }
            (None, None) => {
                return Err(Invalid::new(
                    "ram_amount",
                    "field required (or give ram_mib)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    "ram_mib",
                    "give either ram_amount or ram_mib, not both",
                ))
            }
        };
        if let Some(gb) = self.disk_size_gb {
            if gb == 0 || gb > MAX_DISK_GB {
                return Err(Invalid::new(
                    "disk_size_gb",
                    format!("must be between 1 and {MAX_DISK_GB} (GiB)"),
                ));
            }
        }
        Ok(CreateTemplate {
            name,
            cpu_count,
            ram_mib,
            disk_size_gb: self.disk_size_gb,
        })
    }
}

/// Create a template.
#[utoipa::path(post, path = "/templates", request_body = TemplateRequest, tag = "templates",
    responses((status = 201, body = TemplateResponse), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Body(req): Body<TemplateRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let input = req.parse()?;
    let t = app.service.create_template(input)?;
    Ok((StatusCode::CREATED, Json(TemplateResponse::from(&t))))
}

/// List templates.
#[utoipa::path(get, path = "/templates", tag = "templates",
    responses((status = 200, body = [TemplateResponse])))]
pub async fn list(State(app): State<AppState>) -> Result<Json<Vec<TemplateResponse>>, ApiError> {
    let all = app.service.list_templates()?;
    Ok(Json(all.iter().map(TemplateResponse::from).collect()))
}

/// One template.
#[utoipa::path(get, path = "/templates/{name}", params(("name" = String, Path, description = "The template name")), tag = "templates",
    responses((status = 200, body = TemplateResponse), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    PathName(name): PathName,
) -> Result<Json<TemplateResponse>, ApiError> {
    Ok(Json(TemplateResponse::from(
        &app.service.get_template(&name)?,
    )))
}

/// Delete a template no VM uses.
#[utoipa::path(delete, path = "/templates/{name}", params(("name" = String, Path, description = "The template name")), tag = "templates",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    PathName(name): PathName,
) -> Result<StatusCode, ApiError> {
    app.service.delete_template(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// This module's routes with their documentation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, delete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: u64, gib: Option<u64>, mib: Option<u64>) -> TemplateRequest {
        TemplateRequest {
            name: "t".into(),
            cpu_count: cpu,
            ram_amount: gib,
            ram_mib: mib,
            disk_size_gb: None,
        }
    }

    #[test]
    fn ram_is_given_exactly_once() {
        assert_eq!(req(1, Some(4), None).parse().expect("gib").ram_mib, 4096);
        assert_eq!(req(1, None, Some(256)).parse().expect("mib").ram_mib, 256);
        assert_eq!(
            req(1, None, None).parse().expect_err("none").field,
            "ram_amount"
        );
        assert_eq!(
            req(1, Some(1), Some(1)).parse().expect_err("both").field,
            "ram_mib"
        );
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(
            req(0, Some(1), None).parse().expect_err("cpu").field,
            "cpu_count"
        );
        assert_eq!(
            req(u64::MAX, Some(1), None).parse().expect_err("cpu").field,
            "cpu_count"
        );
        assert_eq!(
            req(1, Some(0), None).parse().expect_err("ram").field,
            "ram_amount"
        );
        assert_eq!(
            req(1, None, Some(1)).parse().expect_err("mib").field,
            "ram_mib"
        );
    }

    #[test]
    fn fractional_gib_is_shown_as_a_fraction() {
        let t = Template {
            name: Name::parse("n", "t").expect("valid"),
            cpu_count: 1,
            ram_mib: 256,
            disk_size_gb: None,
            created_at: String::new(),
        };
        assert_eq!(TemplateResponse::from(&t).ram_amount.as_f64(), Some(0.25));
    }
}
