-- A count of device deletions. Every telemetry batch used to look up all of its devices
-- (1,000 index probes for a batch from 1,000 devices); now a writer remembers the devices
-- it found and looks them up again only after a deletion. Deleters bump this count while
-- they hold the devices lock exclusively (storage/postgres.py, lock_out_writers).
-- A sequence, not a row: reading it and bumping it never block or bloat anything.
CREATE SEQUENCE device_deletions;
