-- Persistent MQTT sessions of the embedded endpoint: a client id's subscriptions while away.
CREATE TABLE mqtt_sessions (
    client_id     TEXT PRIMARY KEY,
    device_id     BLOB NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    subscriptions TEXT NOT NULL,  -- JSON object: topic filter -> granted QoS
    updated_at    INTEGER NOT NULL  -- Unix ms
);
CREATE INDEX mqtt_sessions_device ON mqtt_sessions (device_id);
