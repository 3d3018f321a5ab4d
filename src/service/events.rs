//! Events: every state change and action as `{id, time, type, resource,
//! action, detail}`, kept in the store (newest `VMAN_EVENTS_KEEP`) and
//! broadcast to live subscribers. `Service::emit` is the one way in; VM
//! state changes are emitted by `Service::record` itself.
//!
//! No gap, no duplicate: an event is written and then broadcast under one
//! lock, so broadcast order is id order. A subscriber subscribes first,
//! then replays from the store what is newer than its resume point, then
//! takes live events, skipping those it already replayed (id not above the
//! last one it gave out). A subscriber that falls behind the channel
//! replays the missed ones from the store.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::{Service, ServiceError};
use crate::store::{EventFilter, EventRow, StoreError};
use crate::sync::LockExt;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Vm,
    Disk,
    Template,
    Observer,
    /// A cluster node (`node_lost`).
    Node,
}

impl EventKind {
    pub const ALL: [Self; 5] = [
        Self::Vm,
        Self::Disk,
        Self::Template,
        Self::Observer,
        Self::Node,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Disk => "disk",
            Self::Template => "template",
            Self::Observer => "observer",
            Self::Node => "node",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == raw)
    }
}

/// One event as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: i64,
    pub time: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub resource: String,
    pub action: String,
    pub detail: serde_json::Value,
}

impl From<EventRow> for Event {
    fn from(r: EventRow) -> Self {
        Self {
            id: r.id,
            time: r.time,
            kind: r.kind,
            resource: r.resource,
            action: r.action,
            detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub kind: Option<EventKind>,
    pub resource: Option<String>,
    /// Only events with an id above this one.
    pub since: Option<i64>,
}

impl EventQuery {
    fn filter(&self) -> EventFilter {
        EventFilter {
            kind: self.kind.map(|k| k.as_str().to_owned()),
            resource: self.resource.clone(),
        }
    }

    fn matches(&self, e: &Event) -> bool {
        self.kind.is_none_or(|k| k.as_str() == e.kind)
            && self.resource.as_ref().is_none_or(|r| *r == e.resource)
    }
}

/// Capacity of the live channel; a subscriber further behind replays.
const CHANNEL: usize = 1024;
/// Events read from the store per replay query.
const PAGE: u32 = 500;

/// The live side of the journal, held by the `Service`.
pub(crate) struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    /// Held from the write to the broadcast: broadcast order = id order.
    order: Mutex<()>,
    /// Set at shutdown: open streams end, so a graceful stop does not wait.
    closing: watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CHANNEL).0,
            order: Mutex::new(()),
            closing: watch::channel(false).0,
        }
    }
}

impl Service {
    /// Records an event and hands it to live subscribers. Never fails the
    /// action it describes: a write that fails is logged.
    pub(crate) fn emit(
        &self,
        kind: EventKind,
        resource: &str,
        action: &str,
        detail: serde_json::Value,
    ) {
        let _order = self.events.order.lock_or_recover();
        let text = detail.to_string();
        match self.store.insert_event(
            kind.as_str(),
            resource,
            action,
            &text,
            self.config.events_keep,
        ) {
            Ok(row) => {
                let event = Event {
                    detail,
                    ..Event::from(row)
                };
                // No subscriber is not an error.
                let _ = self.events.tx.send(Arc::new(event));
            }
            Err(e) => tracing::warn!(
                "event {} {resource} {action} not recorded: {e}",
                kind.as_str()
            ),
        }
    }

    /// Past events: those after `since` (oldest first, at most `limit`),
    /// or the newest `limit` without it.
    pub fn list_events(&self, q: &EventQuery, limit: u32) -> Result<Vec<Event>, ServiceError> {
        let rows = match q.since {
            Some(since) => self.store.events_after(since, &q.filter(), limit)?,
            None => self.store.latest_events(&q.filter(), limit)?,
        };
        Ok(rows.into_iter().map(Event::from).collect())
    }

    /// Ends every open event stream (and console socket) at shutdown.
    pub fn close_streams(&self) {
        self.events.closing.send_replace(true);
    }

    /// A receiver that changes once vman shuts down.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.events.closing.subscribe()
    }

    /// Events after `q.since` (or, without it, from now on), then live
    /// ones, without gap or duplicate; ends at shutdown.
    pub fn follow_events(
        self: &Arc<Self>,
        q: EventQuery,
    ) -> Result<impl Stream<Item = Event> + Send + 'static, ServiceError> {
        // The resume point is read before subscribing: whatever comes after
        // it is either replayed from the store or received live.
        let after = match q.since {
            Some(since) => since,
            None => self.store.last_event_id()?,
        };
        let rx = self.events.tx.subscribe();
        Ok(follow(self.clone(), rx, self.closing(), after, q))
    }
}

/// Where a follower replays from.
trait Journal: Send + Sync + 'static {
    fn after(&self, id: i64, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError>;
}

impl Journal for Service {
    fn after(&self, id: i64, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        self.store.events_after(id, filter, PAGE)
    }
}

impl Journal for crate::store::Store {
    fn after(&self, id: i64, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        self.events_after(id, filter, PAGE)
    }
}

/// Events after `after` from `journal`, then from `rx` (subscribed before
/// the first replay), without gap or duplicate.
fn follow(
    journal: Arc<dyn Journal>,
    rx: broadcast::Receiver<Arc<Event>>,
    closing: watch::Receiver<bool>,
    after: i64,
    q: EventQuery,
) -> impl Stream<Item = Event> + Send + 'static {
    let state = Follow {
        rx,
        closing,
        journal,
        after,
        replay: true,
        backlog: VecDeque::new(),
        q,
    };
    futures_util::stream::unfold(state, Follow::next)
}

struct Follow {
    rx: broadcast::Receiver<Arc<Event>>,
    closing: watch::Receiver<bool>,
    journal: Arc<dyn Journal>,
    /// The id of the last event given out (or skipped by the filter).
    after: i64,
    /// Read the store before the channel (at the start, and after lagging).
    replay: bool,
    backlog: VecDeque<Event>,
    q: EventQuery,
}

impl Follow {
    async fn next(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                return Some((e, self));
            }
            if *self.closing.borrow() {
                return None;
            }
            if self.replay {
                match self.journal.after(self.after, &self.q.filter()) {
                    Ok(rows) if rows.is_empty() => self.replay = false,
                    Ok(rows) => {
                        self.backlog.extend(rows.into_iter().map(Event::from));
                        if let Some(last) = self.backlog.back() {
                            self.after = last.id;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("event stream ends: cannot read past events: {e}");
                        return None;
                    }
                }
                continue;
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                _ = self.closing.changed() => return None,
            };
            match received {
                Ok(e) if e.id <= self.after => {}
                Ok(e) => {
                    self.after = e.id;
                    if self.q.matches(&e) {
                        return Some(((*e).clone(), self));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.replay = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The word of a stop method in events ("acpi", "quit", "killed", ...).
pub(crate) fn stop_cause(method: crate::model::StopMethod) -> String {
    match serde_json::to_value(method) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{method:?}"),
    }
}

impl Service {
    /// The event of a recorded VM state change (called by `record`).
    pub(super) fn emit_vm_change(
        &self,
        vm: &crate::model::Vm,
        from: crate::model::VmState,
        event: crate::model::VmEvent,
        detail: &super::record::Detail,
    ) {
        use crate::model::VmEvent::*;
        let first_line = |s: &Option<String>| {
            s.as_deref()
                .and_then(|m| m.lines().next())
                .map(str::to_owned)
        };
        let (action, reason) = match event {
            Started => ("started", None),
            Failed => ("start_failed", first_line(&detail.error)),
            // A power-off nobody asked for is an exit; a stop is a stop.
            Halted
                if detail
                    .cause
                    .as_deref()
                    .is_some_and(|c| c.starts_with("guest")) =>
            {
                ("exited", detail.cause.clone())
            }
            Halted | Killed => ("stopped", None),
            Gone => ("exited", first_line(&detail.error)),
            Adopted => ("adopted", None),
            AdoptionPending => ("adoption_pending", first_line(&detail.error)),
        };
        let mut d = serde_json::json!({
            "from": from.as_str(),
            "state": vm.state.as_str(),
        });
        if let Some(reason) = reason {
            d["reason"] = reason.into();
        }
        if let (Some(cause), "stopped") = (&detail.cause, action) {
            d["method"] = cause.clone().into();
        }
        if let Some(pid) = detail
            .pid
            .filter(|_| vm.state == crate::model::VmState::Running)
        {
            d["pid"] = pid.into();
        }
        if let Some((source, ..)) = &detail.root_disk {
            d["root_disk"] = source.as_str().into();
        }
        let method = detail.cause.as_deref();
        self.counters
            .vm_change(action, method.filter(|_| action == "stopped"));
        if action == "exited" {
            let poweroff = event == Halted;
            self.counters
                .exit(if poweroff { "poweroff" } else { "unexpected" });
        }
        self.emit(EventKind::Vm, vm.id.as_str(), action, d);
    }
}

impl Service {
    /// One `observer` event per finding that was not in the previous pass
    /// (a finding that persists is told once, not every pass).
    pub(super) fn emit_new_findings(&self, before: &[super::Issue], now: &[super::Issue]) {
        let key = |i: &super::Issue| (i.issue_type.clone(), i.resource_id.clone());
        let seen: std::collections::HashSet<_> = before.iter().map(key).collect();
        for issue in now.iter().filter(|i| !seen.contains(&key(i))) {
            let d = serde_json::json!({
                "issue": issue.issue_type,
                "details": issue.details,
                "repaired": issue.repaired,
            });
            self.emit(EventKind::Observer, &issue.resource_id, "finding", d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn setup(
        capacity: usize,
    ) -> (
        tempfile::TempDir,
        Arc<crate::store::Store>,
        broadcast::Sender<Arc<Event>>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(crate::store::Store::open(&dir.path().join("db")).expect("open"));
        (dir, store, broadcast::channel(capacity).0)
    }

    /// Writes an event and broadcasts it, as `emit` does.
    fn emit(store: &crate::store::Store, tx: &broadcast::Sender<Arc<Event>>, name: &str) {
        let row = store
            .insert_event("template", name, "created", "{}", 1000)
            .expect("insert");
        let _ = tx.send(Arc::new(Event::from(row)));
    }

    async fn next_ids(s: &mut (impl Stream<Item = Event> + Unpin), n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("an event in time")
                .expect("stream open");
            out.push(e.id);
        }
        out
    }

    #[tokio::test]
    async fn events_both_replayed_and_received_live_are_given_once() {
        let (_dir, store, tx) = setup(64);
        let (_close, closing) = watch::channel(false);
        emit(&store, &tx, "before");
        // Subscribed, then events written before the replay reads: they are
        // in the store and in the channel.
        let rx = tx.subscribe();
        emit(&store, &tx, "a");
        emit(&store, &tx, "b");
        let mut s = Box::pin(follow(store.clone(), rx, closing, 0, EventQuery::default()));
        assert_eq!(next_ids(&mut s, 3).await, [1, 2, 3]);
        emit(&store, &tx, "live");
        assert_eq!(next_ids(&mut s, 1).await, [4]);
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(100), s.next()).await;
        assert!(quiet.is_err(), "a duplicate: {quiet:?}");
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_replays_what_it_missed() {
        let (_dir, store, tx) = setup(2);
        let (_close, closing) = watch::channel(false);
        let rx = tx.subscribe();
        let mut s = Box::pin(follow(store.clone(), rx, closing, 0, EventQuery::default()));
        emit(&store, &tx, "first");
        assert_eq!(next_ids(&mut s, 1).await, [1]);
        // Done replaying: it waits on the channel now.
        let idle = tokio::time::timeout(std::time::Duration::from_millis(100), s.next()).await;
        assert!(idle.is_err(), "{idle:?}");
        // More than the channel holds while the follower does not read.
        for i in 0..10 {
            emit(&store, &tx, &format!("e{i}"));
        }
        assert_eq!(next_ids(&mut s, 10).await, (2..=11).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn filters_apply_to_replayed_and_live_events() {
        let (_dir, store, tx) = setup(64);
        let (close, closing) = watch::channel(false);
        let rx = tx.subscribe();
        emit(&store, &tx, "x");
        emit(&store, &tx, "y");
        let q = EventQuery {
            resource: Some("y".into()),
            ..EventQuery::default()
        };
        let mut s = Box::pin(follow(store.clone(), rx, closing, 0, q));
        assert_eq!(next_ids(&mut s, 1).await, [2]);
        emit(&store, &tx, "x");
        emit(&store, &tx, "y");
        assert_eq!(next_ids(&mut s, 1).await, [4]);
        // Shutdown ends the stream.
        close.send_replace(true);
        assert!(s.next().await.is_none());
    }
}
