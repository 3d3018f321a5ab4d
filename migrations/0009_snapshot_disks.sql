-- Snapshots of running VMs and of data disks (issue 13, second step).
-- `disks`: a JSON array of the data disks a snapshot holds
-- ([{"id", "format", "virtual_size"}]); their copies are
-- vms/<vm_id>/snapshots/<name>.disks/<disk id>.img.
ALTER TABLE snapshots ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';

-- Snapshot operations under way (intent records): written before the first
-- file changes, removed in the same transaction as the row change that
-- ends the operation. One left at start-up was interrupted by a crash;
-- start-up reconciliation finishes or rolls it back. `op`: create, delete,
-- restore; `plan`: JSON the operation needs to be finished.
CREATE TABLE snapshot_ops (
    vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    op          TEXT NOT NULL,
    plan        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    PRIMARY KEY (vm_id, name)
);
