//! Event rows: the append-only journal of state changes and actions
//! (`migrations/0007_events.sql`), pruned to the newest `keep` on insert.
//! Ids only grow (AUTOINCREMENT), so "after id N" is a resume point.

use super::{Store, StoreError};

/// An event as stored; `detail` is a JSON object in text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub time: String,
    pub kind: String,
    pub resource: String,
    pub action: String,
    pub detail: String,
}

/// Which events a reader wants: after `after` (exclusive), of one type
/// and/or one resource.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub kind: Option<String>,
    pub resource: Option<String>,
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        time: r.get(1)?,
        kind: r.get(2)?,
        resource: r.get(3)?,
        action: r.get(4)?,
        detail: r.get(5)?,
    })
}

impl Store {
    /// Appends an event and drops all but the newest `keep`; returns it
    /// with its id.
    pub fn insert_event(
        &self,
        kind: &str,
        resource: &str,
        action: &str,
        detail: &str,
        keep: u64,
    ) -> Result<EventRow, StoreError> {
        self.write(|tx| {
            let time = crate::model::now();
            tx.prepare_cached(
                "INSERT INTO events (time, type, resource, action, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(rusqlite::params![time, kind, resource, action, detail])?;
            let id = tx.last_insert_rowid();
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            tx.prepare_cached("DELETE FROM events WHERE id <= ?1")?
                .execute([id.saturating_sub(keep)])?;
            Ok(EventRow {
                id,
                time,
                kind: kind.to_owned(),
                resource: resource.to_owned(),
                action: action.to_owned(),
                detail: detail.to_owned(),
            })
        })
    }

    /// Up to `limit` events with an id above `after`, oldest first.
    pub fn events_after(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, time, type, resource, action, detail FROM events
                 WHERE id > ?1 AND (?2 IS NULL OR type = ?2) AND (?3 IS NULL OR resource = ?3)
                 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                rusqlite::params![after, filter.kind, filter.resource, limit],
                event_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The newest `limit` events, oldest first.
    pub fn latest_events(
        &self,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, time, type, resource, action, detail FROM events
                 WHERE (?1 IS NULL OR type = ?1) AND (?2 IS NULL OR resource = ?2)
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                rusqlite::params![filter.kind, filter.resource, limit],
                event_row,
            )?;
            let mut out: Vec<EventRow> = rows.collect::<Result<_, _>>()?;
            out.reverse();
            Ok(out)
        })
    }

    /// The id of the newest event ever recorded (0 before the first),
    /// pruned ones included.
    pub fn last_event_id(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)",
                [],
                |r| r.get(0),
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_pruned_to_keep_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        assert_eq!(store.last_event_id().expect("last"), 0);
        for i in 0..5 {
            let e = store
                .insert_event("vm", &format!("vm{i}"), "created", "{}", 3)
                .expect("insert");
            assert_eq!(e.id, i + 1);
        }
        let all = store
            .events_after(0, &EventFilter::default(), 100)
            .expect("read");
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 4, 5]);
        store
            .write(|tx| Ok(tx.execute("DELETE FROM events", [])?))
            .expect("clear");
        assert_eq!(store.last_event_id().expect("last"), 5);
        let e = store
            .insert_event("vm", "x", "started", "{}", 3)
            .expect("insert");
        assert_eq!(e.id, 6);
    }

    #[test]
    fn filters_and_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        for (kind, res) in [("vm", "a"), ("disk", "d"), ("vm", "b"), ("vm", "a")] {
            store
                .insert_event(kind, res, "x", "{}", 100)
                .expect("insert");
        }
        let f = EventFilter {
            kind: Some("vm".into()),
            resource: Some("a".into()),
        };
        let ids = |v: Vec<EventRow>| v.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(store.events_after(0, &f, 10).expect("r")), [1, 4]);
        assert_eq!(ids(store.events_after(1, &f, 10).expect("r")), [4]);
        let vms = EventFilter {
            kind: Some("vm".into()),
            resource: None,
        };
        assert_eq!(ids(store.latest_events(&vms, 2).expect("r")), [3, 4]);
    }
}
