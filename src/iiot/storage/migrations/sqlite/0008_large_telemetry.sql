-- Devices deleted whose telemetry is still to be purged. A deletion removes the device row
-- and queues its id here in one short write transaction; the points then go in batches,
-- each its own transaction, so ingestion keeps committing meanwhile. A purge cut short
-- is finished from this queue when the store opens again.
CREATE TABLE telemetry_purges (
    device_id BLOB PRIMARY KEY,
    queued_at INTEGER NOT NULL
) WITHOUT ROWID;
