-- Initial schema (PostgreSQL). Times are Unix milliseconds (bigint) in every table.

CREATE TABLE tenants (
    id             uuid PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    created_at     bigint NOT NULL,
    retention_days integer CHECK (retention_days IS NULL OR retention_days > 0)
);

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('sysadmin', 'tenant_admin', 'tenant_user')),
    tenant_id     uuid REFERENCES tenants (id) ON DELETE CASCADE,
    created_at    bigint NOT NULL,
    -- sysadmins belong to no tenant; everybody else belongs to exactly one
    CONSTRAINT users_role_tenant CHECK ((role = 'sysadmin') = (tenant_id IS NULL))
);
CREATE INDEX users_tenant_idx ON users (tenant_id, username);

CREATE TABLE devices (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    status     text NOT NULL DEFAULT 'active',
    token_hash text NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    CONSTRAINT devices_tenant_name_key UNIQUE (tenant_id, name)
);
CREATE INDEX devices_name_idx ON devices (name, id);

-- One row per point. The value keeps its JSON type: exactly one value column is set.
-- No foreign key to devices on purpose: a per-row FK check costs a large share of the
-- bulk-insert speed. Writers instead lock the batch's device rows once (FOR KEY SHARE)
-- and deleters remove a device's telemetry explicitly in the same transaction.
CREATE TABLE telemetry (
    device_id  uuid NOT NULL,
    key        text NOT NULL,
    ts         bigint NOT NULL,
    num_value  double precision,
    int_value  bigint,
    bool_value boolean,
    str_value  text,
    PRIMARY KEY (device_id, key, ts),
    CONSTRAINT telemetry_one_value CHECK (num_nonnulls(num_value, int_value, bool_value, str_value) = 1)
);

-- The newest point of each (device, key): small, so a foreign key costs little here.
CREATE TABLE telemetry_latest (
    device_id  uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key        text NOT NULL,
    ts         bigint NOT NULL,
    num_value  double precision,
    int_value  bigint,
    bool_value boolean,
    str_value  text,
    PRIMARY KEY (device_id, key),
    CONSTRAINT telemetry_latest_one_value CHECK (num_nonnulls(num_value, int_value, bool_value, str_value) = 1)
) WITH (fillfactor = 50);  -- rewritten by every batch: room on the page keeps updates HOT
