-- The bridge network's IP allocator (issue 11): one address per `bridge` VM,
-- taken when the VM is created (in the same transaction as its row), given
-- back when it is deleted (ON DELETE CASCADE). The address is unique; the
-- service never offers the network, gateway or broadcast address. The VM's
-- local_ip is set to the same address.
CREATE TABLE bridge_ips (
    ip          TEXT PRIMARY KEY NOT NULL,
    vm_id       TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL
);
