//! /health, the OpenAPI documents, /docs, unknown routes and wrong methods,
//! and the request log.

use std::time::Duration;

use serde_json::Value;

use crate::common::{detail, Server, DEADLINE};

#[test]
fn health_reports_every_check() {
    let s = Server::start();
    let (status, h) = s.get("/health");
    // qemu may be missing on a test machine: 503 `degraded` is then right,
    // but status code and body must agree.
    match status {
        200 => assert_eq!(h["status"], "ok", "{h}"),
        503 => assert_eq!(h["status"], "degraded", "{h}"),
        other => panic!("health answered {other}: {h}"),
    }
    assert!(h["service"].is_string(), "{h}");
    for check in ["database", "storage", "qemu", "qemu-img"] {
        assert!(
            h["checks"][check]["ok"].is_boolean(),
            "check {check} missing in {h}"
        );
    }
    assert_eq!(h["checks"]["database"]["ok"], true, "{h}");
    assert_eq!(h["checks"]["storage"]["ok"], true, "{h}");
    let all_ok = h["checks"]
        .as_object()
        .expect("checks object")
        .values()
        .all(|c| c["ok"] == true);
    assert_eq!(all_ok, status == 200, "status {status} but checks {h}");
}

#[test]
fn health_is_503_degraded_when_qemu_is_missing() {
    let s = Server::builder()
        .env("VMAN_QEMU_BINARY", "/nonexistent/qemu-system-x86_64")
        .start();
    let (status, h) = s.get("/health");
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["checks"]["qemu"]["ok"], false, "{h}");
    assert_eq!(h["checks"]["database"]["ok"], true, "{h}");
}

#[test]
fn health_is_503_when_storage_is_gone() {
    let s = Server::start();
    std::fs::remove_dir_all(s.storage_path().join("logs")).ok();
    // Make the storage folder unwritable by replacing it with nothing: remove
    // its content and the folder itself (the open database survives).
    let storage = s.storage_path().to_path_buf();
    std::fs::remove_dir_all(&storage).expect("remove storage");
    let (status, h) = s.get("/health");
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["checks"]["storage"]["ok"], false, "{h}");
    std::fs::create_dir_all(&storage).expect("recreate storage for cleanup");
}

#[test]
fn openapi_yaml_and_json_describe_the_routes() {
    let s = Server::start();
    let r = s.raw("GET", "/openapi.yaml", None, &[]);
    assert_eq!(r.status, 200);
    assert!(
        r.text.starts_with("openapi:"),
        "{}",
        &r.text[..r.text.len().min(200)]
    );
    for path in [
        "/templates",
        "/vms",
        "/vms/{vm_id}",
        "/vms/{vm_id}/metadata",
        "/health",
    ] {
        assert!(
            r.text.contains(&format!("{path}:")),
            "{path} missing in yaml"
        );
    }

    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().expect("version").starts_with('3'));
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/templates", &["get", "post"][..]),
        ("/templates/{name}", &["get", "delete"][..]),
        ("/vms", &["get", "post"][..]),
        ("/vms/{vm_id}", &["get", "delete"][..]),
        ("/vms/{vm_id}/metadata", &["get", "put", "delete"][..]),
        ("/health", &["get"][..]),
    ] {
        for m in methods {
            assert!(
                paths.get(path).and_then(|p| p.get(*m)).is_some(),
                "{m} {path} missing in openapi.json"
            );
        }
    }
}

#[test]
fn docs_page_points_at_the_spec() {
    let s = Server::start();
    let r = s.raw("GET", "/docs", None, &[]);
    assert_eq!(r.status, 200);
    assert!(
        r.content_type
            .as_deref()
            .unwrap_or("")
            .starts_with("text/html"),
        "{:?}",
        r.content_type
    );
    assert!(r.text.contains("/openapi."), "{}", r.text);
}

#[test]
fn unknown_routes_are_404_json() {
    let s = Server::start();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/vm"),
        ("GET", "/templates/a/b"),
        ("POST", "/templates/a/b"),
        ("GET", "/vms/a/b/c"),
        ("DELETE", "/vms/a/metadata/x"),
        ("GET", "/../../etc/passwd"),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
    ] {
        let r = s.raw(method, path, None, &[]);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text);
        detail(&r.body);
        assert!(
            r.content_type.as_deref().unwrap_or("").contains("json"),
            "{method} {path}: {:?}",
            r.content_type
        );
    }
}

#[test]
fn wrong_methods_are_405_json() {
    let s = Server::start();
    for (method, path) in [
        ("PATCH", "/vms"),
        ("PUT", "/templates"),
        ("DELETE", "/templates"),
        ("DELETE", "/vms"),
        ("POST", "/health"),
        ("PUT", "/vms/a"),
        ("POST", "/vms/a"),
        ("PATCH", "/templates/a"),
        ("POST", "/vms/a/metadata"),
        ("POST", "/openapi.json"),
    ] {
        let r = s.raw(
            method,
            path,
            Some(b"{}"),
            &[("content-type", "application/json")],
        );
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text);
        detail(&r.body);
    }
}

#[test]
fn every_request_is_logged_with_method_path_status() {
    let s = Server::start();
    assert_eq!(s.get("/templates").0, 200);
    assert_eq!(s.get("/vms/ghost").0, 404);
    assert!(
        s.wait_for_log("GET /templates 200", DEADLINE),
        "no request line in {:#?}",
        s.logs()
    );
    assert!(s.wait_for_log("GET /vms/ghost 404", DEADLINE));
    let line = s
        .logs()
        .into_iter()
        .find(|l| l.contains("GET /templates 200"))
        .expect("line");
    let fields: Vec<&str> = line.split(" | ").collect();
    assert_eq!(
        fields.len(),
        4,
        "timestamp | LEVEL | module | message: {line}"
    );
    assert_eq!(fields[1].trim(), "INFO", "{line}");

    // The same lines go to the rotated file in VMAN_LOG_DIR.
    let file = s.storage_path().join("logs").join("vman.log");
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains("GET /vms/ghost 404") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} lacks the request line",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn error_bodies_are_json_objects() {
    // One assertion over a mix of errors: every body parses as an object whose
    // detail is a string.
    let s = Server::start();
    let replies = [
        s.raw("GET", "/nope", None, &[]),
        s.raw("PATCH", "/vms", None, &[]),
        s.raw("GET", "/vms/x", None, &[]),
        s.raw(
            "POST",
            "/vms",
            Some(b"{"),
            &[("content-type", "application/json")],
        ),
        s.raw("GET", "/vms?state=zzz", None, &[]),
    ];
    for r in replies {
        assert!(r.status >= 400, "{}", r.text);
        let v: Value = serde_json::from_str(&r.text).expect("error body is JSON");
        assert!(v.is_object(), "{v}");
        detail(&v);
    }
}
