//! VMAN_API_TOKEN: every route but /health needs `Authorization: Bearer`.

use serde_json::json;

use crate::common::{detail, Server};

const TOKEN: &str = "s3cret-token";

fn with_token() -> Server {
    Server::builder().api_token(TOKEN).start()
}

#[test]
fn missing_token_is_401_with_detail() {
    let s = with_token();
    for (method, path) in [
        ("GET", "/templates"),
        ("GET", "/vms"),
        ("GET", "/vms/x"),
        ("GET", "/vms/x/metadata"),
        ("GET", "/openapi.json"),
        ("DELETE", "/templates/x"),
    ] {
        let r = s.raw(method, path, None, &[]);
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text);
        detail(&r.body);
    }
}

#[test]
fn wrong_token_is_401() {
    let s = with_token();
    for auth in [
        "Bearer wrong",
        "Bearer s3cret-toke",
        "Bearer s3cret-token2",
        "Bearer ",
        "Basic czNjcmV0LXRva2Vu",
        "s3cret-token",
        "bearer-s3cret-token",
    ] {
        let r = s.raw("GET", "/templates", None, &[("authorization", auth)]);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text);
        detail(&r.body);
    }
}

#[test]
fn write_without_token_creates_nothing() {
    let s = with_token();
    let body = br#"{"name": "small", "cpu_count": 1, "ram_amount": 1}"#;
    let r = s.raw(
        "POST",
        "/templates",
        Some(body),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer nope"),
        ],
    );
    assert_eq!(r.status, 401, "{}", r.text);
    detail(&r.body);
    assert_eq!(s.get("/templates"), (200, json!([])));
}

#[test]
fn right_token_is_200() {
    let s = with_token();
    let auth = format!("Bearer {TOKEN}");
    let r = s.raw("GET", "/templates", None, &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!([]));
    // The helpers send the token: a full create/read round trip works.
    let (status, _) = s.post_json(
        "/templates",
        &json!({"name": "small", "cpu_count": 1, "ram_amount": 1}),
    );
    assert_eq!(status, 201);
    let (status, list) = s.get("/templates");
    assert_eq!(status, 200);
    assert_eq!(list[0]["name"], "small");
}

#[test]
fn health_is_open_without_token() {
    let s = with_token();
    let r = s.raw("GET", "/health", None, &[]);
    assert!(r.status == 200 || r.status == 503, "{}", r.text);
    assert!(r.body["checks"].is_object(), "{}", r.text);
}

#[test]
fn without_token_configured_no_header_is_needed() {
    let s = Server::start();
    let r = s.raw("GET", "/templates", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text);
}
