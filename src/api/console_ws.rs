//! GET /vms/{vm_id}/console/ws: the serial console over a WebSocket, both
//! ways. Output goes out as binary frames as QEMU prints it; text or binary
//! frames in are typed into the guest (dropped for `?readonly=1`). Frames
//! are bounded (`MAX_FRAME`); the socket closes with 1000 when the VM stops
//! and 1001 when vman shuts down. Browsers cannot set headers on a
//! WebSocket, so the token may come as `?token=` on this route.

use std::collections::HashMap;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::extract::PathName;
use super::AppState;
use crate::service::{ConsoleOutput, ConsoleSession};

/// Largest frame (and message) a client may send: console input is typed,
/// not uploaded.
pub const MAX_FRAME: usize = 64 * 1024;

/// True when `query` carries the right `token=` for a console socket.
pub fn query_token_ok(app: &AppState, path: &str, query: Option<&str>) -> bool {
    let Some(token) = &app.token else {
        return true;
    };
    if !(path.starts_with("/vms/") && path.ends_with("/console/ws")) {
        return false;
    }
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|given| super::same_token(given.as_bytes(), token.as_bytes()))
}

/// Live serial console (WebSocket, both ways). Several viewers may watch
/// one VM; `readonly=1` drops the viewer's input. The socket closes when
/// the VM stops. Not a WebSocket request: 426.
#[utoipa::path(get, path = "/vms/{vm_id}/console/ws", tag = "vms",
    params(
        ("vm_id" = String, Path, description = "The VM id"),
        ("readonly" = Option<bool>, Query, description = "1: watch only, input is dropped"),
        ("token" = Option<String>, Query, description = "The API token, for clients that cannot send headers"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 426, body = ErrorBody)))]
pub async fn console_ws(
    State(app): State<AppState>,
    PathName(id): PathName,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let read_only = match query.get("readonly").map(String::as_str) {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(_) => return Err(ApiError::invalid("readonly", "must be 1 or 0")),
    };
    let session = app.service.console_session(&id, read_only)?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("This route speaks WebSocket only ({e})"),
        )
    })?;
    let name = id.to_string();
    Ok(ws
        .max_frame_size(MAX_FRAME)
        .max_message_size(MAX_FRAME)
        .on_upgrade(move |socket| pump(socket, session, name)))
}

async fn pump(mut socket: WebSocket, mut session: ConsoleSession, vm: String) {
    tracing::info!(
        "vm {vm}: console viewer attached{}",
        if session.read_only() {
            " (read-only)"
        } else {
            ""
        }
    );
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            out = session.next() => match out {
                ConsoleOutput::Data(chunk) => {
                    if socket.send(Message::Binary(chunk.to_vec().into())).await.is_err() {
                        break;
                    }
                }
                ConsoleOutput::Missed(n) => {
                    tracing::debug!("vm {vm}: a console viewer missed {n} chunks");
                }
                ConsoleOutput::Ended => {
                    let _ = socket.send(close(1000, "the VM stopped")).await;
                    break;
                }
                ConsoleOutput::ShuttingDown => {
                    let _ = socket.send(close(1001, "vman is shutting down")).await;
                    break;
                }
            },
            input = socket.recv() => match input {
                Some(Ok(Message::Binary(data))) => {
                    if let Err(e) = session.write(&data).await {
                        tracing::debug!("vm {vm}: console input: {e}");
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Err(e) = session.write(text.as_bytes()).await {
                        tracing::debug!("vm {vm}: console input: {e}");
                    }
                }
                // Pings are answered by axum; pongs need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Closed by the client, or a frame over the limit, or a
                // broken connection: the session ends, the VM runs on.
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    tracing::debug!("vm {vm}: console socket: {e}");
                    let _ = socket.send(close(1009, "frame too large or malformed")).await;
                    break;
                }
            },
        }
    }
    tracing::info!("vm {vm}: console viewer detached");
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(console_ws))
}
