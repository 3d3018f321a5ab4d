//! Routes and the OpenAPI document agree: every operation `/openapi.json`
//! documents is served, every route the router serves is documented, and a
//! documented path answers 405 to the methods the document does not list.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::common::{Reply, Server};

/// Every (method, path) the router serves. The router is built from each
/// `api` module's `router()` (route and documentation together); this list
/// is the explicit check from the router's side: a route added without its
/// documentation, or documented without being served, fails below.
const SERVED: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/observer/status"),
    ("GET", "/openapi.json"),
    ("GET", "/openapi.yaml"),
    ("GET", "/docs"),
    ("GET", "/network/config"),
    ("GET", "/templates"),
    ("POST", "/templates"),
    ("GET", "/templates/{name}"),
    ("DELETE", "/templates/{name}"),
    ("GET", "/vms"),
    ("POST", "/vms"),
    ("GET", "/vms/{vm_id}"),
    ("DELETE", "/vms/{vm_id}"),
    ("POST", "/vms/{vm_id}/actions/start"),
    ("POST", "/vms/{vm_id}/actions/stop"),
    ("POST", "/vms/{vm_id}/actions/restart"),
    ("GET", "/vms/{vm_id}/console"),
    ("POST", "/vms/{vm_id}/console"),
    ("GET", "/vms/{vm_id}/metadata"),
    ("PUT", "/vms/{vm_id}/metadata"),
    ("DELETE", "/vms/{vm_id}/metadata"),
    ("GET", "/vms/{vm_id}/ports"),
    ("POST", "/vms/{vm_id}/ports"),
    ("DELETE", "/vms/{vm_id}/ports/{host_port}"),
    ("GET", "/vms/{vm_id}/snapshots"),
    ("POST", "/vms/{vm_id}/snapshots"),
    ("GET", "/vms/{vm_id}/snapshots/{name}"),
    ("DELETE", "/vms/{vm_id}/snapshots/{name}"),
    ("POST", "/vms/{vm_id}/snapshots/{name}/restore"),
    ("POST", "/vms/{vm_id}/clone"),
    ("GET", "/disks"),
    ("POST", "/disks"),
    ("GET", "/disks/{id}"),
    ("DELETE", "/disks/{id}"),
    ("POST", "/disks/{id}/attach"),
    ("POST", "/disks/{id}/detach"),
    ("POST", "/disks/{id}/resize"),
    ("GET", "/events"),
    ("GET", "/vms/{vm_id}/console/ws"),
    ("GET", "/metrics"),
    ("GET", "/cluster/nodes"),
    ("POST", "/vms/{vm_id}/actions/migrate"),
    ("PUT", "/cluster/internal/import/{vm_id}/{kind}/{file}"),
    ("DELETE", "/cluster/internal/import/{vm_id}"),
    ("POST", "/cluster/internal/adopt/{vm_id}"),
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

/// `template` with every `{param}` replaced by an id that names nothing.
fn concrete(template: &str) -> String {
    let mut p = template.to_owned();
    while let (Some(a), Some(b)) = (p.find('{'), p.find('}')) {
        p.replace_range(a..=b, "no-such-id");
    }
    p
}

fn send(s: &Server, method: &str, path: &str) -> Reply {
    // GET /events streams until the client leaves: ask for the list.
    let path = match (method, path) {
        ("GET", "/events") => "/events?follow=false".to_owned(),
        _ => concrete(path),
    };
    s.raw(
        method,
        &path,
        Some(b"{}"),
        &[("content-type", "application/json")],
    )
}

/// The router's own answer for "no route here": 404 with the fallback's
/// detail, or 405.
fn unrouted(r: &Reply) -> bool {
    r.status == 405 || (r.status == 404 && r.body.get("detail") == Some(&"Not Found".into()))
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut out = BTreeSet::new();
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            if METHODS.contains(&method.to_uppercase().as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The bug: `/openapi.json` lacked the actions and the console, so the
/// robustness walk never sent bad input to them.
#[test]
fn actions_and_console_are_in_the_openapi_document() {
    let s = Server::start();
    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    let ops = documented(&doc);
    for (m, p) in [
        ("POST", "/vms/{vm_id}/actions/start"),
        ("POST", "/vms/{vm_id}/actions/stop"),
        ("POST", "/vms/{vm_id}/actions/restart"),
        ("GET", "/vms/{vm_id}/console"),
    ] {
        assert!(
            ops.contains(&(m.to_owned(), p.to_owned())),
            "{m} {p} missing"
        );
    }
}

#[test]
fn every_documented_operation_is_served_and_every_served_route_documented() {
    let s = Server::start();
    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    let ops = documented(&doc);
    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&ops).collect();
    let unlisted: Vec<_> = ops.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not documented: {undocumented:?}"
    );
    assert!(
        unlisted.is_empty(),
        "documented, not in SERVED: {unlisted:?}"
    );

    // Each documented operation reaches a handler (with an id that names
    // nothing: a handler's 404 names the resource, the fallback's does not).
    for (method, path) in &ops {
        let r = send(&s, method, path);
        assert!(
            !unrouted(&r),
            "{method} {path} is documented but not served: {} {}",
            r.status,
            r.text
        );
    }

    // On a documented path, the methods the document does not list are
    // not served either.
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in METHODS {
            if ops.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let r = send(&s, method, path);
            if path.starts_with("/cluster/internal/") {
                // A single host refuses every node-to-node path before
                // routing: 404 not_clustered whatever the method.
                assert_eq!(r.status, 404, "{method} {path}: {}", r.text);
                assert!(
                    r.text.contains("not_clustered"),
                    "{method} {path}: {}",
                    r.text
                );
                continue;
            }
            assert_eq!(
                r.status, 405,
                "{method} {path} is served but not documented: {}",
                r.text
            );
        }
    }
}

/// Every `{param}` of a documented path is declared as a path parameter of
/// each of its operations (OpenAPI requires it; clients generate from it).
#[test]
fn path_parameters_are_declared() {
    let s = Server::start();
    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        let names: Vec<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split('}').next())
            .collect();
        for (method, op) in ops.as_object().expect("operations") {
            for name in &names {
                let declared = op["parameters"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["name"] == *name && p["in"] == "path" && p["required"] == true)
                });
                assert!(declared, "{method} {path}: {{{name}}} not declared");
            }
        }
    }
}
