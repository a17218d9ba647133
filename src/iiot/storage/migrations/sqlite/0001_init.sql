-- Initial schema (SQLite). UUIDs are 16-byte blobs, times are Unix milliseconds.

CREATE TABLE tenants (
    id             BLOB PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    created_at     INTEGER NOT NULL,
    retention_days INTEGER CHECK (retention_days IS NULL OR retention_days > 0)
);

CREATE TABLE users (
    id            BLOB PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('sysadmin', 'tenant_admin', 'tenant_user')),
    tenant_id     BLOB REFERENCES tenants (id) ON DELETE CASCADE,
    created_at    INTEGER NOT NULL,
    -- sysadmins belong to no tenant; everybody else belongs to exactly one
    CONSTRAINT users_role_tenant CHECK ((role = 'sysadmin') = (tenant_id IS NULL))
);
CREATE INDEX users_tenant_idx ON users (tenant_id, username);

CREATE TABLE devices (
    id         BLOB PRIMARY KEY,
    tenant_id  BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'active',
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    CONSTRAINT devices_tenant_name_key UNIQUE (tenant_id, name)
);
CREATE INDEX devices_name_idx ON devices (name, id);

-- WITHOUT ROWID: the primary key is the table's only b-tree, so a (device, key, time)
-- range is one contiguous scan. Exactly one value column is set (the JSON type is kept).
-- Deletes of devices remove telemetry explicitly (like PostgreSQL, no per-row FK check).
CREATE TABLE telemetry (
    device_id  BLOB NOT NULL,
    key        TEXT NOT NULL,
    ts         INTEGER NOT NULL,
    num_value  REAL,
    int_value  INTEGER,
    bool_value INTEGER,
    str_value  TEXT,
    PRIMARY KEY (device_id, key, ts),
    CONSTRAINT telemetry_one_value CHECK (
        (num_value IS NOT NULL) + (int_value IS NOT NULL)
        + (bool_value IS NOT NULL) + (str_value IS NOT NULL) = 1)
) WITHOUT ROWID;

-- The newest point of each (device, key).
CREATE TABLE telemetry_latest (
    device_id  BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    ts         INTEGER NOT NULL,
    num_value  REAL,
    int_value  INTEGER,
    bool_value INTEGER,
    str_value  TEXT,
    PRIMARY KEY (device_id, key),
    CONSTRAINT telemetry_latest_one_value CHECK (
        (num_value IS NOT NULL) + (int_value IS NOT NULL)
        + (bool_value IS NOT NULL) + (str_value IS NOT NULL) = 1)
) WITHOUT ROWID;
