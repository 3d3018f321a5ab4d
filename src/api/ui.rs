//! GET /ui: the web console, a static page (`ui/`, built with esbuild) that
//! build.rs embeds into the binary from `ui/dist`, so a release binary
//! serves it with no files beside it. `index.html` is revalidated on every
//! load (ETag); the bundles under `assets/` carry a content hash in their
//! names and are cached for good. Every answer forbids framing and
//! sniffing and limits the page to its own origin (CSP). The page is public
//! (it holds no data; it asks for the token and sends it to the API). A
//! binary built without `ui/dist` answers `/ui` with how to build it.
//!
//! These routes are not part of the API document (`/openapi.json`); they
//! are merged beside it in `api::router`, under the same guard.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AppState;

/// One embedded file of `ui/dist`.
pub struct Asset {
    /// Relative to `ui/dist`, with `/`.
    pub path: &'static str,
    pub content_type: &'static str,
    /// A quoted content hash.
    pub etag: &'static str,
    pub body: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));

/// The page's policy: scripts, styles and connections (fetch, SSE, the
/// console WebSocket) only from this origin; xterm.js sets inline styles.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Cache policy of the hashed bundles: their names change with their content.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Shown by a binary built without `ui/dist`.
const NOT_BUILT: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>vman: web console not built</title></head><body>\
<h1>The web console is not built into this binary</h1>\
<p>Build it, then build vman again (the files are embedded at compile time):</p>\
<pre>cd ui &amp;&amp; npm ci &amp;&amp; npm run build\ncd .. &amp;&amp; cargo build --release</pre>\
<p><code>scripts/setup.sh</code> installs Node and npm; <code>scripts/test.sh</code> runs both steps.</p>\
<p>The REST API works without it: see <a href=\"/docs\">/docs</a>.</p></body></html>\n";

/// True for the paths of the page, which answer without the API token.
pub fn is_public(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// True when this binary carries the built page.
pub fn built() -> bool {
    find("index.html").is_some()
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Headers every answer of the page carries.
fn protect(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn serve(asset: &'static Asset, cache: &'static str, headers: &HeaderMap) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    protect(&mut resp);
    resp
}

/// GET /ui, /ui/: the page (or how to build it).
async fn page(headers: HeaderMap) -> Response {
    match find("index.html") {
        Some(index) => serve(index, "no-cache", &headers),
        None => {
            let mut resp = (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                NOT_BUILT,
            )
                .into_response();
            protect(&mut resp);
            resp
        }
    }
}

/// GET /ui/{path}: one embedded file.
async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    if path.is_empty() || path == "index.html" {
        return page(headers).await;
    }
    match find(&path) {
        Some(a) if a.path.starts_with("assets/") => serve(a, IMMUTABLE, &headers),
        Some(a) => serve(a, "no-cache", &headers),
        None => {
            let mut resp = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "No such file of the web console",
            )
            .into_response();
            protect(&mut resp);
            resp
        }
    }
}

/// The page's routes (GET and HEAD).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/{*path}", get(asset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_page_is_public() {
        assert!(is_public("/ui"));
        assert!(is_public("/ui/"));
        assert!(is_public("/ui/assets/main-X.js"));
        assert!(!is_public("/uix"));
        assert!(!is_public("/vms"));
        assert!(!is_public("/"));
    }

    #[test]
    fn embedded_files_have_a_type_and_a_quoted_etag() {
        for a in ASSETS {
            assert!(!a.content_type.is_empty(), "{}", a.path);
            assert!(a.etag.starts_with('"') && a.etag.ends_with('"'));
            assert!(!a.path.starts_with('/') && !a.path.contains(".."));
        }
        if let Some(index) = find("index.html") {
            assert!(index.content_type.starts_with("text/html"));
        }
    }

    #[tokio::test]
    async fn a_known_etag_answers_304_and_an_old_one_the_file() {
        static A: Asset = Asset {
            path: "assets/x-1.js",
            content_type: "text/javascript; charset=utf-8",
            etag: "\"abc\"",
            body: b"x",
        };
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"abc\""));
        let r = serve(&A, IMMUTABLE, &h);
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"old\""));
        let r = serve(&A, IMMUTABLE, &h);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CACHE_CONTROL], IMMUTABLE);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
    }
}
