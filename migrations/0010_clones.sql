-- Clones (issue 13). `clones`: one row per VM made by POST /vms/{id}/clone,
-- deleted with the clone; a linked clone's root disk is an overlay on
-- `source_snapshot` of `source_vm`, which may not be deleted (nor the
-- source VM) while the row exists. `clone_jobs`: a clone under way, written
-- before its first file and deleted in the transaction that records the
-- clone, so a row left here names the files of an interrupted clone
-- (removed at the next start-up).
CREATE TABLE clones (
    vm_id            TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    source_vm        TEXT NOT NULL,
    linked           INTEGER NOT NULL CHECK (linked IN (0, 1)),
    source_snapshot  TEXT,
    created_at       TEXT NOT NULL,
    CHECK (linked = 0 OR source_snapshot IS NOT NULL)
);
CREATE INDEX clones_source ON clones(source_vm, source_snapshot);

CREATE TABLE clone_jobs (
    clone_id    TEXT PRIMARY KEY NOT NULL,
    source_vm   TEXT NOT NULL,
    linked      INTEGER NOT NULL CHECK (linked IN (0, 1)),
    -- JSON array of the data disk ids the clone creates.
    disk_ids    TEXT NOT NULL,
    started_at  TEXT NOT NULL
);
