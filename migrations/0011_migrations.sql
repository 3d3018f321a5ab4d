-- Cold migrations under way (issue 14), one row per VM, kept in the SQLite
-- of each side so a restarted vman finishes or rolls back what a kill -9
-- interrupted. `outgoing` (on the source): the VM is being moved to node
-- `peer` (reachable at `peer_url`); `step` is 'copying' until the target
-- has adopted the record, then 'adopted'. `incoming` (on the target): the
-- VM's record and files came from node `peer` and are not this node's until
-- the placement says so; it cannot be started meanwhile. An incoming row
-- appears with the first file received (step 'copying'; `files` lists, as a
-- JSON array, the paths this node wrote for it, so that a roll-back removes
-- those and nothing else) and becomes 'adopted' with the record. No foreign
-- key: an incoming row exists before the VM's record.
CREATE TABLE vm_migrations (
    vm_id       TEXT PRIMARY KEY NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('outgoing', 'incoming')),
    peer        TEXT NOT NULL,
    peer_url    TEXT NOT NULL,
    step        TEXT NOT NULL CHECK (step IN ('copying', 'adopted')),
    files       TEXT NOT NULL DEFAULT '[]',
    created_at  TEXT NOT NULL
);
