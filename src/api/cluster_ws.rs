//! The console WebSocket of a VM on another node, relayed: the caller's
//! upgrade is accepted here only once the owner accepted its own (so every
//! refusal — 404, 400 `not_running`, `too_many_viewers` — is the owner's
//! status and body), then frames are copied both ways until either side
//! closes; the owner's close code (1000 when the VM stops) comes through.

use axum::body::Body;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self as ts, Message};

use super::error::ApiError;
use crate::cluster::{Cluster, TOKEN_HEADER};

/// Relays `GET /vms/{id}/console/ws` to `node`.
pub async fn relay(cluster: &Cluster, node: &str, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(_) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "This route needs a WebSocket upgrade (GET with Upgrade: websocket)",
            )
            .into_response()
        }
    };
    let unreachable = |reason: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unreachable",
            format!("node {node} did not answer: {reason}"),
        )
        .into_response()
    };
    let Some(base) = cluster.node_url(node) else {
        return unreachable("it is offline".into());
    };
    let pq = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let url = format!("ws{}{pq}", base.strip_prefix("http").unwrap_or(&base));
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return unreachable(e.to_string()),
    };
    if let Ok(v) = cluster.token().parse() {
        request.headers_mut().insert(TOKEN_HEADER, v);
    }
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    let upstream = match tokio_tungstenite::connect_async(request).await {
        Ok((s, _)) => s,
        Err(ts::Error::Http(resp)) => {
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = resp.body().clone().unwrap_or_default();
            return (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(body),
            )
                .into_response();
        }
        Err(e) => return unreachable(e.to_string()),
    };
    upgrade.on_upgrade(move |socket| pump(socket, upstream))
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn pump(socket: WebSocket, upstream: Upstream) {
    let (mut down_tx, mut down_rx) = socket.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let to_owner = async {
        while let Some(Ok(m)) = down_rx.next().await {
            let m = match m {
                ws::Message::Text(t) => Message::Text(t.as_str().into()),
                ws::Message::Binary(b) => Message::Binary(b),
                ws::Message::Ping(b) => Message::Ping(b),
                ws::Message::Pong(b) => Message::Pong(b),
                ws::Message::Close(f) => {
                    let f = f.map(|f| CloseFrame {
                        code: CloseCode::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = up_tx.send(Message::Close(f)).await;
                    break;
                }
            };
            if up_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    let to_caller = async {
        while let Some(Ok(m)) = up_rx.next().await {
            let m = match m {
                Message::Text(t) => ws::Message::Text(t.as_str().into()),
                Message::Binary(b) => ws::Message::Binary(b),
                Message::Ping(b) => ws::Message::Ping(b),
                Message::Pong(b) => ws::Message::Pong(b),
                Message::Close(f) => {
                    let f = f.map(|f| ws::CloseFrame {
                        code: u16::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = down_tx.send(ws::Message::Close(f)).await;
                    break;
                }
                Message::Frame(_) => continue,
            };
            if down_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = to_owner => {}
        () = to_caller => {}
    }
}
