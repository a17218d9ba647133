-- Devices gain a type (rules target types; "gateway" may create and feed child devices),
-- the gateway that feeds them, presence (last message time, an open connection) and the
-- fingerprint of a registered X.509 client certificate (MQTT over TLS).
-- last_seen and connected are written in batches by the presence tracker, never per message.
ALTER TABLE devices ADD COLUMN type TEXT NOT NULL DEFAULT 'default';
ALTER TABLE devices ADD COLUMN gateway_id BLOB
    REFERENCES devices (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE devices ADD COLUMN last_seen INTEGER;
ALTER TABLE devices ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN cert_fingerprint TEXT;
CREATE UNIQUE INDEX devices_cert_fingerprint_key ON devices (cert_fingerprint)
    WHERE cert_fingerprint IS NOT NULL;
CREATE INDEX devices_tenant_type_idx ON devices (tenant_id, type);
CREATE INDEX devices_gateway_idx ON devices (gateway_id) WHERE gateway_id IS NOT NULL;
