-- Alarm rules, their per-device evaluation state, alarms, webhooks and the webhook outbox.

CREATE TABLE alarm_rules (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    spec        jsonb NOT NULL,  -- the validated rule body
    created_at  bigint NOT NULL,
    updated_at  bigint NOT NULL,
    CONSTRAINT alarm_rules_tenant_name UNIQUE (tenant_id, name)
);

-- Written at each transition (pending started or reset, raised, cleared), so that a
-- for-duration survives a restart.
CREATE TABLE alarm_rule_state (
    rule_id    uuid NOT NULL REFERENCES alarm_rules (id) ON DELETE CASCADE,
    device_id  uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    state      jsonb NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (rule_id, device_id)
);

CREATE TABLE alarms (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    device_id     uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    type          text NOT NULL,
    severity      text NOT NULL,
    severity_rank integer NOT NULL,
    acknowledged  boolean NOT NULL DEFAULT false,
    cleared       boolean NOT NULL DEFAULT false,
    start_ts      bigint NOT NULL,
    end_ts        bigint NOT NULL,
    ack_ts        bigint,
    ack_by        text,
    clear_ts      bigint,
    value         jsonb,
    rule_id       uuid,
    details       jsonb NOT NULL DEFAULT '{}'
);
-- The database, not the code, guarantees one uncleared alarm per (device, type).
CREATE UNIQUE INDEX alarms_one_open ON alarms (device_id, type) WHERE NOT cleared;
CREATE INDEX alarms_tenant_start ON alarms (tenant_id, start_ts);
CREATE INDEX alarms_device ON alarms (device_id);

CREATE TABLE webhooks (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url        text NOT NULL,
    secret     text NOT NULL,
    events     text NOT NULL,  -- ',alarm.raised,alarm.cleared,'
    created_at bigint NOT NULL
);

-- Written in the same transaction as the change it reports: nothing is lost on a crash.
CREATE TABLE webhook_outbox (
    id              bigserial PRIMARY KEY,
    webhook_id      uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event           text NOT NULL,
    event_id        text NOT NULL,
    body            bytea NOT NULL,
    created_at      bigint NOT NULL,
    next_attempt_at bigint NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    done_at         bigint,
    CONSTRAINT webhook_outbox_once UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE done_at IS NULL;

CREATE TABLE webhook_deliveries (
    id          bigserial PRIMARY KEY,
    webhook_id  uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event       text NOT NULL,
    event_id    text NOT NULL,
    attempt     integer NOT NULL,
    ts          bigint NOT NULL,
    status_code integer,
    error       text,
    duration_ms integer NOT NULL,
    outcome     text NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
