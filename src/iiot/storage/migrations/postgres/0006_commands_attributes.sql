-- Commands to devices (RPC) with every state change, and device attributes.
CREATE TABLE commands (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    device_id   uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    method      text NOT NULL,
    params      text NOT NULL,          -- JSON
    oneway      boolean NOT NULL,
    persistent  boolean NOT NULL,
    timeout_ms  bigint NOT NULL,
    expires_at  bigint NOT NULL,
    retries     integer NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    status      text NOT NULL,
    response    text,                   -- JSON of the device's answer
    error       text,
    sent_by     uuid,                   -- the user who sent it (NULL: SCADA over OPC UA)
    deadline    bigint,                 -- while SENT/DELIVERED: when this attempt times out
    created_at  bigint NOT NULL,
    updated_at  bigint NOT NULL
);
CREATE INDEX commands_device_idx ON commands (device_id, created_at);
-- The sweeper looks only at commands that are not finished yet.
CREATE INDEX commands_open_idx ON commands (status, deadline)
    WHERE status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT');

CREATE TABLE command_transitions (
    command_id  uuid NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    seq         bigserial,
    status      text NOT NULL,
    ts          bigint NOT NULL,
    PRIMARY KEY (command_id, seq)
);

CREATE TABLE device_attributes (
    device_id   uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    scope       text NOT NULL CHECK (scope IN ('client', 'shared', 'server')),
    key         text NOT NULL,
    value       text NOT NULL,          -- JSON
    ts          bigint NOT NULL,
    PRIMARY KEY (device_id, scope, key)
);
