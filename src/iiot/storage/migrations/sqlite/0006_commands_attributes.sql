-- Commands to devices (RPC) with every state change, and device attributes.
CREATE TABLE commands (
    id          BLOB PRIMARY KEY,
    tenant_id   BLOB NOT NULL,
    device_id   BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    method      TEXT NOT NULL,
    params      TEXT NOT NULL,
    oneway      INTEGER NOT NULL,
    persistent  INTEGER NOT NULL,
    timeout_ms  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    retries     INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    status      TEXT NOT NULL,
    response    TEXT,
    error       TEXT,
    sent_by     BLOB,
    deadline    INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX commands_device_idx ON commands (device_id, created_at);
CREATE INDEX commands_open_idx ON commands (status, deadline)
    WHERE status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT');

CREATE TABLE command_transitions (
    command_id  BLOB NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    status      TEXT NOT NULL,
    ts          INTEGER NOT NULL
);
CREATE INDEX command_transitions_idx ON command_transitions (command_id, seq);

CREATE TABLE device_attributes (
    device_id   BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    scope       TEXT NOT NULL CHECK (scope IN ('client', 'shared', 'server')),
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    PRIMARY KEY (device_id, scope, key)
) WITHOUT ROWID;
