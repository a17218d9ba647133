-- Alarm rules, their per-device evaluation state, alarms, webhooks and the webhook outbox.

CREATE TABLE alarm_rules (
    id          BLOB PRIMARY KEY,
    tenant_id   BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    spec        TEXT NOT NULL,  -- the validated rule body (JSON)
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CONSTRAINT alarm_rules_tenant_name UNIQUE (tenant_id, name)
);

-- Written at each transition (pending started or reset, raised, cleared), so that a
-- for-duration survives a restart.
CREATE TABLE alarm_rule_state (
    rule_id    BLOB NOT NULL REFERENCES alarm_rules (id) ON DELETE CASCADE,
    device_id  BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    state      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (rule_id, device_id)
);

CREATE TABLE alarms (
    id            BLOB PRIMARY KEY,
    tenant_id     BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    device_id     BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    type          TEXT NOT NULL,
    severity      TEXT NOT NULL,
    severity_rank INTEGER NOT NULL,
    acknowledged  INTEGER NOT NULL DEFAULT 0,
    cleared       INTEGER NOT NULL DEFAULT 0,
    start_ts      INTEGER NOT NULL,
    end_ts        INTEGER NOT NULL,
    ack_ts        INTEGER,
    ack_by        TEXT,
    clear_ts      INTEGER,
    value         TEXT,  -- JSON
    rule_id       BLOB,
    details       TEXT NOT NULL DEFAULT '{}'
);
-- The database, not the code, guarantees one uncleared alarm per (device, type).
CREATE UNIQUE INDEX alarms_one_open ON alarms (device_id, type) WHERE cleared = 0;
CREATE INDEX alarms_tenant_start ON alarms (tenant_id, start_ts);

CREATE TABLE webhooks (
    id         BLOB PRIMARY KEY,
    tenant_id  BLOB NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url        TEXT NOT NULL,
    secret     TEXT NOT NULL,
    events     TEXT NOT NULL,  -- ",alarm.raised,alarm.cleared,"
    created_at INTEGER NOT NULL
);

-- Written in the same transaction as the change it reports: nothing is lost on a crash.
CREATE TABLE webhook_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      BLOB NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event           TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    body            BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    done_at         INTEGER,
    CONSTRAINT webhook_outbox_once UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE done_at IS NULL;

CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id  BLOB NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event       TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    outcome     TEXT NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
