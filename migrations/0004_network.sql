-- Networking (issue 11). Each VM has a network mode; VMs made before this
-- migration keep 'none' (no NIC, as they ran until now). Port forwards of
-- user-mode VMs: a host port and protocol belong to one VM at most (the
-- primary key), whatever address they are bound on.
ALTER TABLE vms ADD COLUMN network_mode TEXT NOT NULL DEFAULT 'none'
    CHECK (network_mode IN ('user', 'bridge', 'none'));

CREATE TABLE port_forwards (
    host_port     INTEGER NOT NULL CHECK (host_port BETWEEN 1 AND 65535),
    protocol      TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    vm_id         TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    guest_port    INTEGER NOT NULL CHECK (guest_port BETWEEN 1 AND 65535),
    host_address  TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (host_port, protocol)
);
CREATE INDEX port_forwards_vm ON port_forwards(vm_id);
