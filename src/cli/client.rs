//! The CLI's HTTP side: a small blocking client of the REST API (reqwest,
//! already vman's test client, so no new crates) and the one place where an
//! outcome becomes an exit code: 0 ok, 1 refused by the server (its `detail`
//! on stderr), 2 usage, 3 server unreachable (with the URL tried).
//! Never touches the database: everything goes over the API.

use std::time::Duration;

use reqwest::blocking::{Client as Http, RequestBuilder};
use reqwest::Method;
use serde_json::Value;

/// How long connecting may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with an error status (or the operation did not
    /// reach its goal, e.g. a launched guest that never came up).
    #[error("{detail}")]
    Refused {
        /// HTTP status, when the server said it.
        status: Option<u16>,
        detail: String,
        code: Option<String>,
    },
    /// Bad arguments or local input (unreadable file, bad URL).
    #[error("{0}")]
    Usage(String),
    /// No HTTP answer at all from `url`.
    #[error("cannot reach the vman server at {url}: {reason} (set VMAN_URL or --url)")]
    Unreachable { url: String, reason: String },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused { .. } => 1,
            Self::Usage(_) => 2,
            Self::Unreachable { .. } => 3,
        }
    }

    /// A refusal made by the CLI itself (no HTTP status).
    pub fn failed(detail: impl Into<String>) -> Self {
        Self::Refused {
            status: None,
            detail: detail.into(),
            code: None,
        }
    }

    /// True for the server's 404.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                status: Some(404),
                ..
            }
        )
    }
}

/// One vman server: base URL, optional token, a connection kept alive.
pub struct Client {
    base: String,
    token: Option<String>,
    http: Http,
}

impl Client {
    /// `base` must be `http://HOST[:PORT][/prefix]` (vman speaks plain HTTP).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, CliError> {
        let base = base.trim().trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("VMAN_URL/--url {base:?} is not a URL: {e}")))?;
        if parsed.scheme() != "http" || parsed.host_str().is_none() {
            return Err(CliError::Usage(format!(
                "VMAN_URL/--url {base:?} must look like http://HOST:PORT (vman speaks plain HTTP)"
            )));
        }
        let http = Http::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A start copies a boot disk, a stop waits for the guest: no
            // overall deadline (the server bounds its own work).
            .timeout(None::<Duration>)
            .build()
            .map_err(|e| CliError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        let token = token.filter(|t| !t.trim().is_empty());
        Ok(Self { base, token, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token, when one is set (the console socket sends it itself).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A GET of `path` with its headers, answered as a stream (SSE): the
    /// response whatever its status; only a missing answer is an error.
    pub fn get_stream(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<reqwest::blocking::Response, CliError> {
        let mut req = self.builder(Method::GET, path);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.send().map_err(|e| unreachable(&self.url(path), &e))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn builder(&self, method: Method, path: &str) -> RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// Sends a request; a 2xx answers its JSON body (`Null` when empty),
    /// anything else is a `CliError`.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let (status, text) = self.call_raw(method, path, body)?;
        answer(status, &text)
    }

    /// Sends a request and returns the status and body text, whatever the
    /// status (only a missing answer is an error).
    pub fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), CliError> {
        let url = self.url(path);
        let mut req = self.builder(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().map_err(|e| unreachable(&url, &e))?;
        let status = resp.status().as_u16();
        let text = resp.text().map_err(|e| unreachable(&url, &e))?;
        Ok((status, text))
    }

    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(Method::POST, path, Some(body))
    }

    /// POST without a body (actions that take none).
    pub fn post_empty(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::POST, path, None)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(Method::PUT, path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::DELETE, path, None)
    }
}

/// A transport error: no HTTP answer. reqwest names the URL in its message;
/// the source chain says why (connection refused, DNS, reset).
fn unreachable(url: &str, e: &reqwest::Error) -> CliError {
    let mut reason = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    if reason.is_empty() {
        reason = e.to_string();
    }
    CliError::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

/// Sorts an HTTP answer: 2xx → its body; else the server's `detail`.
pub fn answer(status: u16, text: &str) -> Result<Value, CliError> {
    let body: Option<Value> = if text.trim().is_empty() {
        Some(Value::Null)
    } else {
        serde_json::from_str(text).ok()
    };
    if (200..300).contains(&status) {
        return body.ok_or_else(|| {
            CliError::failed(format!(
                "the server answered {status} with a body that is not JSON (is VMAN_URL a vman server?): {}",
                snippet(text)
            ))
        });
    }
    let body = body.unwrap_or(Value::Null);
    let detail = match body.get("detail") {
        Some(Value::String(s)) => s.clone(),
        // FastAPI-style validation lists.
        Some(other @ (Value::Array(_) | Value::Object(_))) => other.to_string(),
        _ if text.trim().is_empty() => format!("HTTP {status}"),
        _ => format!("HTTP {status}: {}", snippet(text)),
    };
    Err(CliError::Refused {
        status: Some(status),
        detail,
        code: body.get("code").and_then(Value::as_str).map(str::to_owned),
    })
}

fn snippet(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

/// A path segment as the API expects it (names are `[A-Za-z0-9._-]`, but a
/// user may type anything: percent-encode the rest so it stays one segment).
pub fn seg(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `.` and `..` alone would be resolved away by the URL parser.
    match out.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => out,
    }
}

/// Which collection a short reference is looked up in.
#[derive(Clone, Copy)]
pub enum Kind {
    Vm,
    Disk,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Self::Vm => "/vms",
            Self::Disk => "/disks",
        }
    }
}

/// The API addresses VMs and disks by id (the name given at creation, else a
/// UUID). `resolve` finds the id for what the user typed when that is not an
/// id itself: a `name` field equal to it, or a unique id prefix (of a UUID,
/// as with container ids). None when nothing else matches (the caller then
/// reports the server's own 404).
pub fn resolve(client: &Client, kind: Kind, typed: &str) -> Result<Option<String>, CliError> {
    let list = client.get(kind.collection())?;
    let items = list.as_array().cloned().unwrap_or_default();
    let id_of = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_owned);
    if items.iter().any(|v| id_of(v).as_deref() == Some(typed)) {
        return Ok(None);
    }
    let by_name: Vec<String> = items
        .iter()
        .filter(|v| v.get("name").and_then(Value::as_str) == Some(typed))
        .filter_map(id_of)
        .collect();
    let candidates = if by_name.is_empty() && typed.len() >= 4 {
        items
            .iter()
            .filter_map(id_of)
            .filter(|id| id.starts_with(typed))
            .collect()
    } else {
        by_name
    };
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(candidates.into_iter().next()),
        _ => Err(CliError::failed(format!(
            "{typed:?} matches several: {}; give more of the id",
            candidates.join(", ")
        ))),
    }
}

/// Runs `op` with the id the user typed; when the server says 404, looks the
/// reference up (`resolve`) and runs `op` once more with the id found. The
/// common case (an exact id) costs no extra request.
pub fn with_id<T>(
    client: &Client,
    kind: Kind,
    typed: &str,
    mut op: impl FnMut(&str) -> Result<T, CliError>,
) -> Result<T, CliError> {
    match op(typed) {
        Err(e) if e.is_not_found() => match resolve(client, kind, typed)? {
            Some(id) if id != typed => op(&id),
            _ => Err(e),
        },
        other => other,
    }
}

/// The id `typed` stands for (an exact id, a name, a unique prefix), or the
/// server's 404 — for commands that need the id before they act.
pub fn resolve_id(client: &Client, kind: Kind, typed: &str) -> Result<String, CliError> {
    let path = format!("{}/{}", kind.collection(), seg(typed));
    with_id(client, kind, typed, |id| {
        if id == typed {
            client.get(&path).map(|_| typed.to_owned())
        } else {
            Ok(id.to_owned())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(CliError::failed("x").exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let down = CliError::Unreachable {
            url: "http://127.0.0.1:1/vms".into(),
            reason: "Connection refused".into(),
        };
        assert_eq!(down.exit_code(), 3);
        assert!(down.to_string().contains("http://127.0.0.1:1/vms"));
    }

    #[test]
    fn answers_are_sorted_by_status() {
        assert_eq!(answer(200, r#"{"a":1}"#).unwrap()["a"], 1);
        assert_eq!(answer(204, "").unwrap(), Value::Null);
        let e = answer(
            400,
            r#"{"detail":"VM is already running","code":"invalid_state"}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "VM is already running");
        assert!(
            matches!(e, CliError::Refused { status: Some(400), code: Some(ref c), .. } if c == "invalid_state")
        );
        let e = answer(404, "<html>no</html>").unwrap_err();
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "HTTP 404: <html>no</html>");
        assert_eq!(answer(502, "").unwrap_err().to_string(), "HTTP 502");
        // A 2xx that is not JSON is no vman answer.
        assert_eq!(answer(200, "hello").unwrap_err().exit_code(), 1);
    }

    #[test]
    fn segments_stay_one_segment() {
        assert_eq!(seg("my-vm_1.x"), "my-vm_1.x");
        assert_eq!(seg("a/b"), "a%2Fb");
        assert_eq!(seg(".."), "%2E%2E");
        assert_eq!(seg("a b?"), "a%20b%3F");
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        assert!(Client::new("http://127.0.0.1:8000/", None).is_ok());
        for bad in ["https://x", "127.0.0.1:8000", "ftp://x", "http://", ""] {
            let e = Client::new(bad, None).err().expect(bad);
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }
}
