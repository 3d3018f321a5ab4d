-- When the guest last fetched its meta-data from vman's metadata service
-- (issue 11); NULL until it first does. Written at most every 30 s per VM.
ALTER TABLE vms ADD COLUMN metadata_fetched_at TEXT;
