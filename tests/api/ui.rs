//! GET /ui: the web console's page and bundles as the server answers them
//! (the browser tests are in tests/ui): public while the API needs its
//! token, the right content types and cache headers, revalidation by ETag,
//! the same Host/Origin guard as the API, and a "how to build it" page
//! from a binary built without `ui/dist`. And the console token given as
//! `?token=` (the page's WebSocket) never reaches the request log.

use std::time::Duration;

use reqwest::blocking::Response;
use reqwest::header;

use crate::common::Server;

const TOKEN: &str = "ui-api-test-token-0123456789";

fn get(s: &Server, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = s.http().get(s.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().expect("GET")
}

fn head(r: &Response, name: header::HeaderName) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The bundles index.html loads: `/ui/assets/...` in src= and href=.
fn asset_urls(index: &str) -> Vec<String> {
    index
        .split('"')
        .filter(|p| p.starts_with("/ui/assets/"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_page_answers_without_the_token_with_types_cache_headers_and_protections() {
    let s = Server::builder().api_token(TOKEN).start();
    // The API still wants the token ...
    assert_eq!(get(&s, "/vms", &[]).status(), 401);
    // ... the page does not: it asks for it.
    for path in ["/ui", "/ui/", "/ui/index.html"] {
        let r = get(&s, path, &[]);
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(head(&r, header::CONTENT_TYPE), "text/html; charset=utf-8");
        assert_eq!(head(&r, header::X_FRAME_OPTIONS), "DENY");
        assert_eq!(head(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        let csp = head(&r, header::CONTENT_SECURITY_POLICY);
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    }
    let index = get(&s, "/ui/", &[]);
    if !vman::api::ui::built() {
        assert_eq!(head(&index, header::CACHE_CONTROL), "no-store");
        let text = index.text().expect("body");
        assert!(text.contains("npm ci &amp;&amp; npm run build"), "{text}");
        return;
    }
    assert_eq!(head(&index, header::CACHE_CONTROL), "no-cache");
    let etag = head(&index, header::ETAG);
    assert!(etag.starts_with('"'), "{etag}");
    let text = index.text().expect("body");
    let assets = asset_urls(&text);
    assert!(
        assets.iter().any(|a| a.ends_with(".js")) && assets.iter().any(|a| a.ends_with(".css")),
        "{assets:?}"
    );
    for a in &assets {
        let r = get(&s, a, &[]);
        assert_eq!(r.status(), 200, "{a}");
        let want = if a.ends_with(".js") {
            "text/javascript; charset=utf-8"
        } else {
            "text/css; charset=utf-8"
        };
        assert_eq!(head(&r, header::CONTENT_TYPE), want, "{a}");
        assert_eq!(
            head(&r, header::CACHE_CONTROL),
            "public, max-age=31536000, immutable"
        );
        // Revalidation: the same ETag gives 304 without a body.
        let tag = head(&r, header::ETAG);
        let again = get(&s, a, &[("If-None-Match", &tag)]);
        assert_eq!(again.status(), 304);
    }
    let again = get(&s, "/ui/", &[("If-None-Match", &etag)]);
    assert_eq!(again.status(), 304);
    let stale = get(&s, "/ui/", &[("If-None-Match", "\"old\"")]);
    assert_eq!(stale.status(), 200);
}

#[test]
fn a_missing_file_of_the_page_is_a_json_404_and_other_methods_a_405() {
    let s = Server::start();
    let r = s.raw("GET", "/ui/assets/nothing-here.js", None, &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "not_found");
    let r = s.raw("GET", "/ui/../vms", None, &[]);
    assert_ne!(r.status, 500);
    let r = s.raw(
        "POST",
        "/ui/",
        Some(b"{}"),
        &[("Content-Type", "application/json")],
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.body["code"], "method_not_allowed");
}

#[test]
fn the_host_and_origin_guard_applies_to_the_page() {
    let s = Server::start();
    let r = s.raw("GET", "/ui/", None, &[("Host", "rebound.example")]);
    assert_eq!(r.status, 403);
    assert_eq!(r.body["code"], "host_not_allowed");
    let r = s.raw("GET", "/ui/", None, &[("Origin", "http://evil.example")]);
    assert_eq!(r.status, 403);
    assert_eq!(r.body["code"], "origin_not_allowed");
    let own = format!("http://127.0.0.1:{}", s.port());
    let r = s.raw("GET", "/ui/", None, &[("Origin", &own)]);
    assert_eq!(r.status, 200);
}

#[test]
fn the_console_token_in_the_query_never_reaches_the_request_log() {
    let s = Server::builder().api_token(TOKEN).start();
    let path = format!("/vms/nothing/console/ws?token={TOKEN}");
    let r = s.raw("GET", &path, None, &[]);
    // Authorized by the query token, then refused: no such VM.
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(
        s.wait_for_log("GET /vms/nothing/console/ws 404", Duration::from_secs(10)),
        "the request is logged"
    );
    assert!(
        !s.logs_contain(TOKEN),
        "the token is in the log:\n{}",
        s.logs().join("\n")
    );
}
