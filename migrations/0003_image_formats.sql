-- The format of every image a VM uses, pinned when it is accepted and passed
-- to QEMU explicitly from then on, never probed again (issue 9, hole 2):
-- qcow2_path and boot_disk at creation, the root disk when vman makes it or
-- first uses a root.qcow2 placed by hand. NULL on rows made before this
-- migration: pinned at their next start.
ALTER TABLE vms ADD COLUMN qcow2_path_format TEXT
    CHECK (qcow2_path_format IS NULL OR qcow2_path_format IN ('qcow2', 'raw'));
ALTER TABLE vms ADD COLUMN boot_disk_format TEXT
    CHECK (boot_disk_format IS NULL OR boot_disk_format IN ('qcow2', 'raw'));
ALTER TABLE vms ADD COLUMN root_disk_format TEXT
    CHECK (root_disk_format IS NULL OR root_disk_format IN ('qcow2', 'raw'));
