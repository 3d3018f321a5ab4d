//! The cross-site guard: what a web page in the user's browser must not be
//! able to make vman do. Three checks, run before the token check:
//!
//! - `Host` must name this server (loopback names when listening on
//!   loopback, plus `VMAN_ALLOWED_HOSTS`), which defeats DNS rebinding;
//! - `Origin`, when sent, must be one of those hosts or the request's own
//!   host. The middleware runs on every route of the router, so a WebSocket
//!   upgrade (a GET, never preflighted) added there is covered as is; code
//!   that upgrades elsewhere calls `Guard::check_origin` itself;
//! - a request that may carry a body (anything but GET/HEAD/OPTIONS) must
//!   have no `Content-Type` or a JSON one (`application/json`,
//!   `application/*+json`, as FastAPI): the types a browser sends cross-site
//!   without a preflight (`text/plain`, forms, multipart) get 415.
//!
//! Refusals are 403 (host, origin) and 415 (content type) with the usual
//! `{"detail","code"}` body.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::config::Config;

/// Host names accepted in `Host` and `Origin`, lowercase, without port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    /// No `Host` check; `Origin` must then match the request's own `Host`.
    Any,
    Only(Vec<String>),
}

/// The `Host`/`Origin` policy of one server.
#[derive(Debug, Clone)]
pub struct Guard {
    hosts: AllowedHosts,
}

impl Guard {
    /// Loopback names (and the listen address) on loopback; any host beyond
    /// loopback (the token protects it); `VMAN_ALLOWED_HOSTS` adds names, or
    /// `*` lifts the check.
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.host, &config.allowed_hosts)
    }

    pub fn new(listen: IpAddr, configured: &[String]) -> Self {
        if configured.iter().any(|h| h == "*") || !listen.is_loopback() && configured.is_empty() {
            return Self {
                hosts: AllowedHosts::Any,
            };
        }
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let own = match listen {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        names.push(own);
        names.extend(configured.iter().cloned());
        names.sort();
        names.dedup();
        Self {
            hosts: AllowedHosts::Only(names),
        }
    }

    fn allows(&self, host: &str) -> bool {
        match &self.hosts {
            AllowedHosts::Any => true,
            AllowedHosts::Only(names) => names.iter().any(|n| n == host),
        }
    }

    /// The `Host` header (or the authority of an absolute URI) must be an
    /// allowed host. A request without one cannot come from a browser.
    pub fn check_host(&self, req: &Request) -> Result<(), ApiError> {
        let Some(raw) = request_host(req) else {
            return Ok(());
        };
        match host_name(&raw) {
            Some(h) if self.allows(&h) => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                format!(
                    "Host {raw:?} is not served here; use localhost or add the name to VMAN_ALLOWED_HOSTS"
                ),
            )),
        }
    }

    /// A present `Origin` must be an allowed host or the request's own host.
    /// Also the check of a WebSocket upgrade (browsers do not preflight them).
    pub fn check_origin(
        &self,
        headers: &HeaderMap,
        own_host: Option<&str>,
    ) -> Result<(), ApiError> {
        let values: Vec<_> = headers.get_all(header::ORIGIN).iter().collect();
        if values.is_empty() {
            return Ok(());
        }
        let own = own_host.and_then(host_name);
        let ok = values.iter().all(|v| {
            let origin_host = v.to_str().ok().and_then(origin_host);
            match origin_host {
                Some(h) => self.allows_origin(&h) || own.as_deref() == Some(h.as_str()),
                None => false,
            }
        });
        if ok {
            Ok(())
        } else {
            let shown = values
                .first()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(not text)");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("Requests from origin {shown:?} are not allowed (cross-site request)"),
            ))
        }
    }

    /// With `Any`, only the request's own host is a trusted origin.
    fn allows_origin(&self, host: &str) -> bool {
        match &self.hosts {
            AllowedHosts::Any => false,
            AllowedHosts::Only(_) => self.allows(host),
        }
    }
}

/// The host a request was sent to, as the client wrote it.
fn request_host(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::HOST) {
        return Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    req.uri().authority().map(|a| a.as_str().to_owned())
}

/// `Name:port`, `1.2.3.4`, `[::1]:80` → lowercase name without port and
/// trailing dot; `None` when it is not a plausible authority.
pub fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim();
    if a.is_empty() || a.contains(['/', '@', ' ', '\t']) {
        return None;
    }
    let host = if a.starts_with('[') {
        let end = a.find(']')?;
        let rest = &a[end + 1..];
        if !(rest.is_empty() || rest.starts_with(':') && valid_port(&rest[1..])) {
            return None;
        }
        &a[..=end]
    } else {
        match a.split_once(':') {
            Some((h, port)) if valid_port(port) => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn valid_port(p: &str) -> bool {
    p.is_empty() || p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// `http://name:port` → `name`; `null` and anything else → `None`.
fn origin_host(origin: &str) -> Option<String> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    if !matches!(
        scheme.to_ascii_lowercase().as_str(),
        "http" | "https" | "ws" | "wss"
    ) {
        return None;
    }
    host_name(rest.trim_end_matches('/'))
}

/// Methods that may carry a body; the others are not checked.
fn may_have_body(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// True for no `Content-Type`, an empty one, `application/json` and
/// `application/*+json` (any parameters).
pub fn is_json_or_absent(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_TYPE).iter().all(|v| {
        let Ok(text) = v.to_str() else {
            return false;
        };
        let essence = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence.is_empty() {
            return true;
        }
        match essence.split_once('/') {
            Some(("application", sub)) => sub == "json" || sub.len() > 5 && sub.ends_with("+json"),
            _ => false,
        }
    })
}

fn check_content_type(req: &Request) -> Result<(), ApiError> {
    if !may_have_body(req.method()) || is_json_or_absent(req.headers()) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Request bodies must be JSON: send Content-Type: application/json",
    ))
}

/// The middleware: host, then origin, then content type.
pub async fn enforce(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let own = request_host(&req);
    let verdict = guard
        .check_host(&req)
        .and_then(|()| guard.check_origin(req.headers(), own.as_deref()))
        .and_then(|()| check_content_type(&req));
    match verdict {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn loopback() -> Guard {
        Guard::new(IpAddr::from([127, 0, 0, 1]), &[])
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn host_names_lose_port_case_and_dot() {
        assert_eq!(host_name("LocalHost:8000").as_deref(), Some("localhost"));
        assert_eq!(host_name("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_name("localhost.:1").as_deref(), Some("localhost"));
        for bad in ["", "a b", "x:y", "[::1", "[::1]x", "u@h", "h:123456"] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn loopback_accepts_only_loopback_names() {
        let g = loopback();
        for ok in ["localhost", "127.0.0.1", "[::1]"] {
            assert!(g.allows(ok), "{ok}");
        }
        for bad in ["evil.example", "127.0.0.2", "localhost.evil.example"] {
            assert!(!g.allows(bad), "{bad}");
        }
        let g = Guard::new(IpAddr::from([127, 0, 0, 1]), &["vman.lan".into()]);
        assert!(g.allows("vman.lan") && g.allows("localhost") && !g.allows("x.lan"));
        let g = Guard::new(IpAddr::from([127, 0, 0, 1]), &["*".into()]);
        assert!(g.allows("anything"));
        let g = Guard::new(IpAddr::from([0, 0, 0, 0]), &[]);
        assert!(g.allows("anything"));
    }

    #[test]
    fn foreign_origins_are_refused() {
        let g = loopback();
        let own = Some("127.0.0.1:8000");
        assert!(g.check_origin(&HeaderMap::new(), own).is_ok());
        for ok in [
            "http://localhost:3000",
            "http://127.0.0.1:8000",
            "https://[::1]",
        ] {
            assert!(
                g.check_origin(&headers(&[(header::ORIGIN, ok)]), own)
                    .is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "http://evil.example",
            "null",
            "file://",
            "evil",
            "http://localhost.evil:1",
        ] {
            let e = g
                .check_origin(&headers(&[(header::ORIGIN, bad)]), own)
                .expect_err(bad);
            assert_eq!(e.status, StatusCode::FORBIDDEN);
        }
        // Beyond loopback with no list: same-origin only.
        let g = Guard::new(IpAddr::from([0, 0, 0, 0]), &[]);
        let h = headers(&[(header::ORIGIN, "http://vm.host:8000")]);
        assert!(g.check_origin(&h, Some("vm.host:8000")).is_ok());
        assert!(g.check_origin(&h, Some("other.host:8000")).is_err());
    }

    #[test]
    fn only_json_content_types_pass() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
            "",
        ] {
            assert!(
                is_json_or_absent(&headers(&[(header::CONTENT_TYPE, ok)])),
                "{ok}"
            );
        }
        assert!(is_json_or_absent(&HeaderMap::new()));
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/json",
            "application/+json",
            "application/jsonx",
        ] {
            assert!(
                !is_json_or_absent(&headers(&[(header::CONTENT_TYPE, bad)])),
                "{bad}"
            );
        }
    }
}
