-- Changes made by `iiot` commands while the platform runs in another process (device
-- created, disabled, deleted...). The command appends the same live event a REST change
-- publishes; the running platform polls this table once a second and publishes new rows
-- on its live bus (OPC UA address space, device cache). Rows older than an hour are
-- removed by the next command that writes one.
CREATE TABLE live_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    payload    TEXT NOT NULL
);
