//! What every operation of the OpenAPI document shares, added in one pass
//! so no handler annotation can forget it: the `{name}` path parameters the
//! `PathName` extractor reads, and the error answers the middleware and the
//! body extractor give (401 token, 403 host/origin, 415 content type, 400
//! malformed JSON, 413 too large, 422 invalid, 404 unknown id).

use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::{
    ContentBuilder, Object, OpenApi, Ref, RefOr, Required, ResponseBuilder, Type,
};
use utoipa::Modify;

/// Applied by `api::assembled` to the whole document.
pub struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, doc: &mut OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let names = path_params(path);
            let ops = [
                (false, item.get.as_mut()),
                (false, item.head.as_mut()),
                (true, item.post.as_mut()),
                (true, item.put.as_mut()),
                (true, item.patch.as_mut()),
                (true, item.delete.as_mut()),
            ];
            for (may_have_body, op) in ops {
                if let Some(op) = op {
                    complete(op, path, &names, may_have_body);
                }
            }
        }
    }
}

/// `/vms/{vm_id}/metadata` → `["vm_id"]`.
fn path_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(str::to_owned)
        .collect()
}

fn complete(op: &mut Operation, path: &str, names: &[String], may_have_body: bool) {
    let params = op.parameters.get_or_insert_with(Vec::new);
    for name in names {
        if !params.iter().any(|p| &p.name == name) {
            params.push(name_param(name));
        }
    }
    if params.is_empty() {
        op.parameters = None;
    }
    let mut add = |status: &str, what: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(what));
    };
    add("403", "Host or Origin not allowed (cross-site request)");
    if path != "/health" {
        add(
            "401",
            "Missing or wrong API token (when VMAN_API_TOKEN is set)",
        );
    }
    if !names.is_empty() {
        add("404", "Not found");
    }
    if may_have_body {
        add("415", "Content-Type is not JSON");
    }
    if op.request_body.is_some() {
        add("400", "Malformed JSON");
        add("413", "Request body too large");
        add("422", "Invalid field");
    }
}

fn name_param(name: &str) -> Parameter {
    let mut schema = Object::with_type(Type::String);
    schema.pattern = Some(crate::model::NAME_PATTERN.to_owned());
    schema.max_length = Some(63);
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(schema))
        .build()
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_params_are_found() {
        assert_eq!(path_params("/vms/{vm_id}/metadata"), vec!["vm_id"]);
        assert!(path_params("/vms").is_empty());
    }

    #[test]
    fn every_templated_path_declares_its_parameters() {
        let (_, doc) = super::super::assembled();
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.post, &item.put, &item.delete]
                .into_iter()
                .flatten()
            {
                let declared: Vec<&str> = op
                    .parameters
                    .iter()
                    .flatten()
                    .map(|p| p.name.as_str())
                    .collect();
                for name in path_params(path) {
                    assert!(declared.contains(&name.as_str()), "{path}: {name}");
                }
                assert!(op.responses.responses.contains_key("403"), "{path}");
            }
        }
    }
}
