//! VMAN_API_TOKEN: every route needs `Authorization: Bearer` (/health
//! without it tells only its status); weak tokens are refused at start-up.

use serde_json::json;

use crate::common::{detail, Server};

const TOKEN: &str = "s3cret-token-0123456789";

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
        "Bearer s3cret-token-012345678",
        "Bearer s3cret-token-01234567890",
        "Bearer ",
        "Basic czNjcmV0LXRva2VuLTAxMjM0NTY3ODk=",
        "s3cret-token-0123456789",
        "bearer-s3cret-token-0123456789",
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

/// Issue 9, hole 7: /health told anyone the storage path, QEMU version and
/// memory. Without the token it now answers `{status}` only.
#[test]
fn health_without_token_shows_only_status() {
    let s = with_token();
    for headers in [
        &[][..],
        &[("authorization", "Bearer wrong-token-0123456789")][..],
    ] {
        let r = s.raw("GET", "/health", None, headers);
        assert!(r.status == 200 || r.status == 503, "{}", r.text);
        let keys: Vec<&String> = r.body.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["status"], "{}", r.text);
        assert!(
            !r.text.contains(s.storage_path().to_str().expect("utf8")) && !r.text.contains("QEMU"),
            "{}",
            r.text
        );
    }
    let auth = format!("Bearer {TOKEN}");
    let r = s.raw("GET", "/health", None, &[("authorization", &auth)]);
    assert!(r.status == 200 || r.status == 503, "{}", r.text);
    assert!(r.body["checks"].is_object(), "{}", r.text);
    assert_eq!(r.body["service"], "vman", "{}", r.text);
}

/// Issue 9, hole 5: a whitespace-only token was accepted.
#[test]
fn short_or_whitespace_token_is_refused_at_start_up() {
    for token in [
        "                        ",
        "short-token",
        "   0123456789abcde   ",
    ] {
        for host in ["127.0.0.1", "0.0.0.0"] {
            let out = Server::builder().host(host).api_token(token).run_to_exit();
            assert!(
                !out.timed_out,
                "{token:?} on {host}: server started: {out:?}"
            );
            assert_ne!(out.code, Some(0), "{out:?}");
            let lines = out.stderr_lines();
            assert_eq!(lines.len(), 1, "{token:?}: {out:?}");
            assert!(
                lines[0].contains("VMAN_API_TOKEN") && lines[0].contains("16"),
                "{lines:?}"
            );
        }
    }
    // Exactly 16 non-space characters is enough.
    let s = Server::builder().api_token("0123456789abcdef").start();
    let r = s.raw(
        "GET",
        "/templates",
        None,
        &[("authorization", "Bearer 0123456789abcdef")],
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn without_token_configured_no_header_is_needed() {
    let s = Server::start();
    let r = s.raw("GET", "/templates", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text);
}
