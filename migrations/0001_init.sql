-- Templates, VMs and their cloud-init metadata.
CREATE TABLE templates (
    name          TEXT PRIMARY KEY NOT NULL,
    cpu_count     INTEGER NOT NULL CHECK (cpu_count >= 1),
    ram_mib       INTEGER NOT NULL CHECK (ram_mib >= 1),
    disk_size_gb  INTEGER,
    created_at    TEXT NOT NULL
);

CREATE TABLE vms (
    id                TEXT PRIMARY KEY NOT NULL,
    template_name     TEXT NOT NULL REFERENCES templates(name) ON DELETE RESTRICT,
    state             TEXT NOT NULL CHECK (state IN ('stopped', 'running', 'error')),
    local_ip          TEXT,
    qcow2_path        TEXT,
    boot_disk         TEXT,
    root_disk_source  TEXT,
    root_disk_path    TEXT,
    root_disk_size    INTEGER,
    pid               INTEGER,
    last_error        TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX vms_state ON vms(state);
CREATE INDEX vms_template ON vms(template_name);

CREATE TABLE vm_metadata (
    vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    hostname    TEXT,
    user_data   TEXT,
    ssh_keys    TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
