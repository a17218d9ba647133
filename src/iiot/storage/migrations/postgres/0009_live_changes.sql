-- Nothing to change on PostgreSQL: `iiot` commands send their changes to running platform
-- processes with NOTIFY on the live bridge's channel. SQLite's 0009 adds the table it polls
-- instead; this version keeps the schema versions of both stores in step.
SELECT 1;
