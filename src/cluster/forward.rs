//! Forwarding a request to the node that owns the VM: same method, path,
//! query, body and the caller's `Authorization`, plus the cluster token
//! (`X-Vman-Cluster-Token`) so the owner answers it itself; the owner's
//! status, content type and body come back unchanged.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;

use super::{Cluster, TOKEN_HEADER};

/// Why a forward got no answer from the owner.
#[derive(Debug, thiserror::Error)]
#[error("node {node} ({url}) did not answer: {reason}")]
pub struct Unreachable {
    pub node: String,
    pub url: String,
    pub reason: String,
}

/// Sends the request to `node` and gives back its answer as is.
pub async fn forward(
    cluster: &Cluster,
    node: &str,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Unreachable> {
    let unreachable = |url: &str, reason: String| Unreachable {
        node: node.to_owned(),
        url: url.to_owned(),
        reason,
    };
    let Some(base) = cluster.node_url(node) else {
        return Err(unreachable("-", "it is offline (no live lease)".into()));
    };
    let url = format!("{base}{path_and_query}");
    let mut req = cluster
        .http
        .request(method, &url)
        .header(TOKEN_HEADER, cluster.token())
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v.clone());
        }
    }
    let resp = req
        .send()
        .await
        .map_err(|e| unreachable(&base, e.to_string()))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let extra: Vec<(header::HeaderName, HeaderValue)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "location" | "www-authenticate" | "retry-after" | "cache-control"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| unreachable(&base, e.to_string()))?;
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    for (k, v) in extra {
        out.headers_mut().insert(k, v);
    }
    Ok(out)
}
