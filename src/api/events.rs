//! GET /events: the event journal, as Server-Sent Events (resumable with
//! `Last-Event-ID` or `?since=`) or, with `?follow=false`, as a JSON list.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::service::{Event, EventKind, EventQuery};

/// Events listed at most by one `follow=false` request.
const MAX_LIMIT: u32 = 10_000;
const DEFAULT_LIMIT: u32 = 1000;

/// One event: a state change or an action.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventResponse {
    /// Grows by one per event, never reused: the resume point.
    pub id: i64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `vm`, `disk`, `template` or `observer`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The VM, disk or template id (for `observer`: what the finding is about).
    pub resource: String,
    /// `created`, `started`, `start_failed`, `stopped`, `exited`, `adopted`,
    /// `adoption_pending`, `deleted`, `metadata_updated`, `metadata_cleared`,
    /// `attached`, `detached`, `resized`, `finding`.
    pub action: String,
    /// What goes with it (`reason` of an exit, `state`, `method` of a stop, ...).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<Event> for EventResponse {
    fn from(e: Event) -> Self {
        Self {
            id: e.id,
            time: e.time,
            kind: e.kind,
            resource: e.resource,
            action: e.action,
            detail: e.detail,
        }
    }
}

fn parse_bool(field: &'static str, raw: &str) -> Result<bool, ApiError> {
    match raw {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(ApiError::invalid(field, "must be true or false")),
    }
}

fn parse_id(field: &'static str, raw: &str) -> Result<i64, ApiError> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::invalid(field, "must be an event id (a whole number >= 0)"))
}

/// The query: filters, resume point, and whether to follow.
fn parse(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(EventQuery, bool, u32), ApiError> {
    let kind = query
        .get("type")
        .map(|t| {
            EventKind::parse(t).ok_or_else(|| {
                ApiError::invalid("type", "must be one of vm, disk, template, observer, node")
            })
        })
        .transpose()?;
    let resource = match query.get("resource") {
        Some(r) if r.is_empty() || r.len() > 255 => {
            return Err(ApiError::invalid(
                "resource",
                "must be a VM, disk or template id",
            ))
        }
        r => r.cloned(),
    };
    // A reconnecting EventSource sends Last-Event-ID: it wins over ?since=.
    let last = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be an event id"))
                .and_then(|s| parse_id("Last-Event-ID", s))
        })
        .transpose()?;
    let since = match last {
        Some(id) => Some(id),
        None => query
            .get("since")
            .map(|s| parse_id("since", s))
            .transpose()?,
    };
    let follow = query
        .get("follow")
        .map(|f| parse_bool("follow", f))
        .transpose()?
        .unwrap_or(true);
    let limit = query
        .get("limit")
        .map(|l| {
            l.parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| ApiError::invalid("limit", "must be between 1 and 10000"))
        })
        .transpose()?
        .unwrap_or(DEFAULT_LIMIT);
    Ok((
        EventQuery {
            kind,
            resource,
            since,
        },
        follow,
        limit,
    ))
}

/// Events. By default a Server-Sent Events stream (`text/event-stream`,
/// each event's `id:` is its id, `data:` its JSON): events after `since`
/// (or `Last-Event-ID`) are sent first, then live ones, without gap or
/// duplicate; without either, only new events. `follow=false`: a JSON list
/// of past events (after `since`, oldest first; else the newest `limit`).
#[utoipa::path(get, path = "/events", tag = "events",
    params(
        ("follow" = Option<bool>, Query, description = "Stream (default true) or list past events (false)"),
        ("since" = Option<i64>, Query, description = "Only events with a larger id"),
        ("type" = Option<String>, Query, description = "vm, disk, template or observer"),
        ("resource" = Option<String>, Query, description = "Only events of this VM, disk or template id"),
        ("limit" = Option<u32>, Query, description = "follow=false: at most this many (1-10000, default 1000)"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event (wins over since)"),
    ),
    responses(
        (status = 200, description = "text/event-stream of EventResponse, or (follow=false) a JSON list", body = [EventResponse]),
        (status = 422, body = ErrorBody)))]
pub async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (q, follow, limit) = parse(&query, &headers)?;
    if !follow {
        let list = app.service.list_events(&q, limit)?;
        let wire: Vec<EventResponse> = list.into_iter().map(EventResponse::from).collect();
        return Ok(Json(wire).into_response());
    }
    let stream = app.service.follow_events(q)?.map(|e| {
        let id = e.id.to_string();
        let event = SseEvent::default()
            .id(id)
            .json_data(EventResponse::from(e))
            .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"));
        Ok::<_, Infallible>(event)
    });
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(15));
    Ok(Sse::new(stream).keep_alive(keep_alive).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}
