"""The statements of `PgControlStore` that change commands, each atomic by itself.

Every state change is one statement: a conditional UPDATE (`WHERE status = ANY(allowed)`)
and the INSERT of its transition rows in the same CTE, so a state never goes backwards and
two processes racing for one command cannot both win. The transition arrays a statement
returns were read before its own rows were added; the caller appends those.
"""

from __future__ import annotations

from iiot.storage.control import in_flight_sql

__all__ = ["ANSWER", "CLAIM", "COLS", "CREATE", "GET", "TRANSITION"]

_NAMES = (
    "id",
    "tenant_id",
    "device_id",
    "method",
    "params",
    "oneway",
    "persistent",
    "timeout_ms",
    "expires_at",
    "retries",
    "attempts",
    "status",
    "response",
    "error",
    "sent_by",
    "deadline",
    "created_at",
    "updated_at",
)
COLS = ", ".join(_NAMES)
_QUALIFIED = ", ".join(f"commands.{name}" for name in _NAMES)
_HISTORY = """
    ARRAY(SELECT status FROM command_transitions WHERE command_id = u.id ORDER BY seq) AS t_status,
    ARRAY(SELECT ts FROM command_transitions WHERE command_id = u.id ORDER BY seq) AS t_ts"""


def _is_next(expires_after: str | None) -> str:
    """The command row `commands` is its device's next one: none other in flight and none
    older QUEUED (`expires_after`: only QUEUED ones that expire after it count). Of two
    racing claims the newer one's snapshot sees the older QUEUED (not committed yet) or SENT,
    so it is refused: no lock is needed."""
    unexpired = "" if expires_after is None else f" AND o.expires_at > {expires_after}"
    return f"""NOT EXISTS (
          SELECT 1 FROM commands o WHERE o.device_id = commands.device_id AND o.id <> commands.id
            AND ((o.status IN ('SENT', 'DELIVERED', 'TIMEOUT') AND {in_flight_sql("o")})
              OR (o.status = 'QUEUED'{unexpired}
                  AND (o.created_at, o.id) < (commands.created_at, commands.id))))"""


TRANSITION = f"""
WITH u AS (
    UPDATE commands SET status = $3, updated_at = $4, deadline = $5,
        response = CASE WHEN $6 THEN $7 ELSE response END,
        error = coalesce($8, error),
        attempts = attempts + $9
    WHERE id = $1 AND status = ANY($2::text[])
      AND ($10::uuid IS NULL OR tenant_id = $10) AND ($11::uuid IS NULL OR device_id = $11)
      AND NOT (oneway AND $3 = 'SUCCESSFUL')  -- a one-way command has no answer
      AND (NOT $12 OR {_is_next(None)})
    RETURNING {COLS}
), t AS (
    INSERT INTO command_transitions (command_id, status, ts) SELECT id, status, updated_at FROM u
)
SELECT u.*,{_HISTORY}
FROM u
"""

# The device's oldest QUEUED command that has not expired becomes SENT (the sweeper expires
# the others), with whether another one is QUEUED behind it: delivering a command costs
# one statement, not a read and a claim. $3: only if it is the device's next (sequential).
CLAIM = f"""
WITH n AS (
    SELECT id FROM commands
    WHERE device_id = $1 AND status = 'QUEUED' AND expires_at > $2
      AND ($4::uuid IS NULL OR tenant_id = $4)
    ORDER BY created_at, id LIMIT 1
    FOR UPDATE
), u AS (
    UPDATE commands SET status = 'SENT', updated_at = $2, deadline = $2 + commands.timeout_ms,
        attempts = commands.attempts + 1
    FROM n
    WHERE commands.id = n.id AND commands.status = 'QUEUED'
      AND (NOT $3 OR {_is_next("$2")})
    RETURNING {_QUALIFIED}
), t AS (
    INSERT INTO command_transitions (command_id, status, ts) SELECT id, 'SENT', $2 FROM u
)
SELECT u.*,{_HISTORY},
    EXISTS (
        SELECT 1 FROM commands q WHERE q.device_id = $1 AND q.status = 'QUEUED'
          AND q.id <> u.id AND q.expires_at > $2
    ) AS more
FROM u
"""

# The device's answer: a two-way command of this device that is still open becomes
# SUCCESSFUL; if it was SENT (the answer overtook the receipt), DELIVERED is recorded at
# the same time first, since an answer proves delivery. `was`: the status it left.
ANSWER = f"""
WITH p AS (
    SELECT id, status FROM commands
    WHERE id = $1 AND device_id = $2 AND ($5::uuid IS NULL OR tenant_id = $5) AND NOT oneway
      AND status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT')
    FOR UPDATE
), u AS (
    UPDATE commands SET status = 'SUCCESSFUL', updated_at = $3, deadline = NULL, response = $4
    FROM p
    WHERE commands.id = p.id
    RETURNING {_QUALIFIED}, p.status AS was
), t AS (
    INSERT INTO command_transitions (command_id, status, ts)
    SELECT u.id, s.status, $3
    FROM u, (VALUES (1, 'DELIVERED'), (2, 'SUCCESSFUL')) AS s (n, status)
    WHERE s.n = 2 OR u.was = 'SENT'
    ORDER BY s.n
)
SELECT u.*,{_HISTORY}
FROM u
"""

GET = f"""
SELECT {COLS},
    ARRAY(SELECT status FROM command_transitions WHERE command_id = $1 ORDER BY seq) AS t_status,
    ARRAY(SELECT ts FROM command_transitions WHERE command_id = $1 ORDER BY seq) AS t_ts
FROM commands WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)
"""

# One statement: the device's scope check, the command and its first transition. With
# $14 (`claim`) and no other unexpired QUEUED command of the device ahead of it, the command
# is claimed as it is stored: SENT, with both transitions, as `CLAIM` would leave it.
CREATE = f"""
WITH d AS (
    SELECT id FROM devices WHERE id = $3 AND ($13::uuid IS NULL OR tenant_id = $13)
), s AS (
    SELECT $14 AND NOT EXISTS (
        SELECT 1 FROM commands o WHERE o.device_id = $3 AND o.status = 'QUEUED'
          AND o.expires_at > $12
    ) AS sent
), c AS (
    INSERT INTO commands ({COLS})
    SELECT $1, $2, d.id, $4, $5, $6, $7, $8, $9, $10,
        CASE WHEN s.sent THEN 1 ELSE 0 END, CASE WHEN s.sent THEN 'SENT' ELSE 'QUEUED' END,
        NULL, NULL, $11, CASE WHEN s.sent THEN $12 + $8 END, $12, $12
    FROM d, s
    RETURNING {COLS}
), t AS (
    INSERT INTO command_transitions (command_id, status, ts)
    SELECT c.id, x.status, $12
    FROM c, (VALUES (1, 'QUEUED'), (2, 'SENT')) AS x (n, status)
    WHERE x.n = 1 OR c.status = 'SENT'
    ORDER BY x.n
)
SELECT * FROM c
"""
