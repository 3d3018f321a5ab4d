-- Data disks and where they are attached. A disk is attached exactly when
-- vm_id is set; slot is then the hot-plug root port (hp<slot>) it uses in
-- that VM. Deleting a VM frees its disks.
CREATE TABLE disks (
    id           TEXT PRIMARY KEY NOT NULL,
    size_gb      INTEGER NOT NULL CHECK (size_gb >= 1),
    mount_point  TEXT,
    path         TEXT NOT NULL,
    format       TEXT NOT NULL CHECK (format IN ('qcow2', 'raw')),
    vm_id        TEXT REFERENCES vms(id) ON DELETE SET NULL,
    slot         INTEGER CHECK (slot IS NULL OR slot >= 0),
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE UNIQUE INDEX disks_vm_slot ON disks(vm_id, slot) WHERE vm_id IS NOT NULL;
CREATE INDEX disks_vm ON disks(vm_id);
