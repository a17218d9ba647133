-- Persistent MQTT sessions of the embedded endpoint: a client id's subscriptions while away.
CREATE TABLE mqtt_sessions (
    client_id     text PRIMARY KEY,
    device_id     uuid NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    subscriptions jsonb NOT NULL,  -- topic filter -> granted QoS
    updated_at    bigint NOT NULL  -- Unix ms
);
CREATE INDEX mqtt_sessions_device ON mqtt_sessions (device_id);
