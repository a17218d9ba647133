-- Large telemetry tables.
--
-- 1. Devices deleted whose telemetry is still to be purged. A deletion removes the device
--    row and queues its id here under the writers' lock; the points then go in batches,
--    each its own transaction, so ingestion never waits for them (storage/postgres_purge.py).
--    A purge cut short is finished from this queue when the store opens again.
CREATE TABLE telemetry_purges (
    device_id uuid PRIMARY KEY,
    queued_at bigint NOT NULL
);

-- 2. Telemetry partitioned by time: one partition per week of ts (Unix ms, weeks counted
--    from the epoch), made ahead of time by the store (storage/postgres_partitions.py).
--    Retention drops whole partitions instead of deleting their rows one by one, and
--    each partition's key stays small enough to be cached.
--
--    The existing table keeps its rows and its key: it becomes the partition
--    `telemetry_legacy` for every ts before the start of next week, so converting a large
--    table costs one scan (the range check below) and no copy. Points already stored for
--    later times move to the default partition, which catches every ts outside the
--    weekly partitions (dates far in the past or future).
ALTER TABLE telemetry RENAME TO telemetry_legacy;
ALTER TABLE telemetry_legacy RENAME CONSTRAINT telemetry_pkey TO telemetry_legacy_pkey;

CREATE TABLE telemetry (
    device_id  uuid NOT NULL,
    key        text NOT NULL,
    ts         bigint NOT NULL,
    num_value  double precision,
    int_value  bigint,
    bool_value boolean,
    str_value  text,
    -- As migration 0002: numeric values in the key make history reads index-only.
    PRIMARY KEY (device_id, key, ts) INCLUDE (num_value, int_value, bool_value),
    CONSTRAINT telemetry_one_value CHECK (num_nonnulls(num_value, int_value, bool_value, str_value) = 1)
) PARTITION BY RANGE (ts);

CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT
    WITH (autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000);

DO $$
DECLARE
    week CONSTANT bigint := 604800000;
    now_ms CONSTANT bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    boundary CONSTANT bigint := (now_ms / week + 1) * week;  -- the start of next week
BEGIN
    IF EXISTS (SELECT 1 FROM telemetry_legacy) THEN
        INSERT INTO telemetry_default SELECT * FROM telemetry_legacy WHERE ts >= boundary;
        DELETE FROM telemetry_legacy WHERE ts >= boundary;
        -- A valid CHECK matching the range lets ATTACH skip its own scan of the table.
        EXECUTE format(
            'ALTER TABLE telemetry_legacy ADD CONSTRAINT telemetry_legacy_range CHECK (ts < %s)',
            boundary);
        EXECUTE format(
            'ALTER TABLE telemetry ATTACH PARTITION telemetry_legacy'
            ' FOR VALUES FROM (MINVALUE) TO (%s)', boundary);
        ALTER TABLE telemetry_legacy DROP CONSTRAINT telemetry_legacy_range;
    ELSE
        DROP TABLE telemetry_legacy;
    END IF;
END
$$;
