//! Issue 9, hole 4: on the default loopback, no-token set-up a web page could
//! POST with `Content-Type: text/plain` and a foreign `Host` (DNS rebinding)
//! and create VMs or type into their consoles. Bodies must be JSON, `Host`
//! must be a loopback name (or `VMAN_ALLOWED_HOSTS`), a foreign `Origin` is
//! refused.

use serde_json::json;

use crate::common::{detail, Server};

const TEMPLATE: &[u8] = br#"{"name": "small", "cpu_count": 1, "ram_amount": 1}"#;

fn templates(s: &Server) -> serde_json::Value {
    let (status, list) = s.get("/templates");
    assert_eq!(status, 200, "{list}");
    list
}

#[test]
fn text_plain_post_is_refused_with_415() {
    let s = Server::start();
    for ct in [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "text/json",
    ] {
        let r = s.raw(
            "POST",
            "/templates",
            Some(TEMPLATE),
            &[("content-type", ct)],
        );
        assert_eq!(r.status, 415, "{ct}: {}", r.text);
        assert_eq!(r.body["code"], "unsupported_media_type", "{}", r.text);
        detail(&r.body);
    }
    assert_eq!(
        templates(&s),
        json!([]),
        "a refused request created something"
    );
    // Bodiless actions too: a form with no fields must not start a VM.
    let r = s.raw(
        "POST",
        "/vms/some-vm/actions/start",
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(r.status, 415, "{}", r.text);
    let r = s.raw(
        "PUT",
        "/vms/some-vm/metadata",
        Some(br#"{"hostname": "x"}"#),
        &[("content-type", "text/plain")],
    );
    assert_eq!(r.status, 415, "{}", r.text);
}

#[test]
fn json_plus_json_and_absent_content_types_are_accepted() {
    let s = Server::start();
    for (i, ct) in [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/vnd.vman+json"),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(r#"{{"name": "t{i}", "cpu_count": 1, "ram_amount": 1}}"#);
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let r = s.raw("POST", "/templates", Some(body.as_bytes()), &headers);
        assert_eq!(r.status, 201, "{ct:?}: {}", r.text);
    }
    // GET with any content type is not a body.
    let r = s.raw("GET", "/templates", None, &[("content-type", "text/plain")]);
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn foreign_host_is_refused_with_403() {
    let s = Server::start();
    let port = s.port();
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("10.0.0.1:{port}"),
    ] {
        let r = s.raw(
            "POST",
            "/templates",
            Some(TEMPLATE),
            &[("content-type", "application/json"), ("host", &host)],
        );
        assert_eq!(r.status, 403, "{host}: {}", r.text);
        assert_eq!(r.body["code"], "host_not_allowed", "{}", r.text);
        detail(&r.body);
    }
    assert_eq!(templates(&s), json!([]));
    for host in [
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "127.0.0.1".to_owned(),
        format!("[::1]:{port}"),
    ] {
        let r = s.raw("GET", "/templates", None, &[("host", &host)]);
        assert_eq!(r.status, 200, "{host}: {}", r.text);
    }
}

#[test]
fn allowed_hosts_setting_admits_its_names_only() {
    let s = Server::builder()
        .env("VMAN_ALLOWED_HOSTS", "vman.lan, Other.Example")
        .start();
    for (host, want) in [
        ("vman.lan:8000", 200),
        ("other.example", 200),
        ("localhost", 200),
        ("evil.example", 403),
    ] {
        let r = s.raw("GET", "/templates", None, &[("host", host)]);
        assert_eq!(r.status, want, "{host}: {}", r.text);
    }
    let r = s.raw(
        "GET",
        "/templates",
        None,
        &[("origin", "http://vman.lan:8000")],
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn bad_allowed_hosts_setting_is_refused_at_start_up() {
    let out = Server::builder()
        .env("VMAN_ALLOWED_HOSTS", "http://vman.lan/")
        .run_to_exit();
    assert!(!out.timed_out, "{out:?}");
    assert_ne!(out.code, Some(0), "{out:?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(lines[0].contains("VMAN_ALLOWED_HOSTS"), "{lines:?}");
}

#[test]
fn foreign_origin_is_refused_with_403() {
    let s = Server::start();
    for origin in [
        "http://evil.example",
        "https://evil.example:8000",
        "null",
        "http://localhost.evil.example",
    ] {
        let r = s.raw(
            "POST",
            "/templates",
            Some(TEMPLATE),
            &[("content-type", "application/json"), ("origin", origin)],
        );
        assert_eq!(r.status, 403, "{origin}: {}", r.text);
        assert_eq!(r.body["code"], "origin_not_allowed", "{}", r.text);
        detail(&r.body);
        // Reads too (a WebSocket upgrade is a GET).
        let r = s.raw("GET", "/vms", None, &[("origin", origin)]);
        assert_eq!(r.status, 403, "{origin}: {}", r.text);
    }
    assert_eq!(templates(&s), json!([]));
    // The server's own pages (/docs) and other loopback origins work.
    let own = format!("http://127.0.0.1:{}", s.port());
    let r = s.raw(
        "POST",
        "/templates",
        Some(TEMPLATE),
        &[("content-type", "application/json"), ("origin", &own)],
    );
    assert_eq!(r.status, 201, "{}", r.text);
}

/// The README's examples must work as written: every curl line that sends a
/// body also sends the JSON content type.
#[test]
fn readme_curl_lines_with_a_body_send_json() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    // Join continuation lines so a command is one line.
    let joined = readme.replace("\\\n", " ");
    let bad: Vec<&str> = joined
        .lines()
        .filter(|l| l.contains("curl ") && (l.contains(" -d ") || l.contains("--data")))
        .filter(|l| !l.contains("Content-Type: application/json"))
        .collect();
    assert!(
        bad.is_empty(),
        "curl lines without the JSON header: {bad:#?}"
    );
}
