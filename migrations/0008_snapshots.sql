-- Snapshots of a VM's root disk (issue 13, first step: stopped VMs only).
-- The file is {storage}/vms/<vm_id>/snapshots/<name>.qcow2; `parent` is the
-- snapshot whose file it has as backing (NULL at the bottom). Deleted with
-- their VM.
CREATE TABLE snapshots (
    vm_id         TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    description   TEXT,
    created_at    TEXT NOT NULL,
    parent        TEXT,
    vm_state      TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    virtual_size  INTEGER NOT NULL,
    PRIMARY KEY (vm_id, name)
);
