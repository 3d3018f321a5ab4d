-- Events: every state change and action, in the order they happened.
-- AUTOINCREMENT: an id is never reused, even once older events are pruned
-- (VMAN_EVENTS_KEEP), so a client resuming from its Last-Event-ID never
-- takes a new event for one it has seen.
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    type TEXT NOT NULL,
    resource TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_resource ON events (resource, id);
