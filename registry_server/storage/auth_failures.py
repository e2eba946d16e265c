"""Failed-authentication meters shared through the metadata index (no I/O here).

One row per meter key that has failures still draining: when they will have drained
(wall-clock seconds). Every process adds the failures it saw and reads back what all
have seen (``auth/failure_sharing.py``), so a client trying passwords over several
workers or replicas meets one limit, not one per process. Drained rows are removed by
whoever adds next.
"""

from __future__ import annotations

from collections.abc import Sequence

from registry_server.storage.sqltx import Query, Tx

# The same statement in both engines' SQL (SQLite's schema is in sqlite_index.py).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_failures (
    meter TEXT NOT NULL,
    key BLOB NOT NULL,
    drained_at REAL NOT NULL,
    PRIMARY KEY (meter, key)
);
CREATE INDEX IF NOT EXISTS auth_failures_drained ON auth_failures (drained_at);
"""

# A key's failures drain from the later of its stored time and now: the GCRA of
# auth/ratelimit.py, kept in the row.
_ADD = (
    "INSERT INTO auth_failures (meter, key, drained_at) VALUES (?, ?, ?) "
    "ON CONFLICT (meter, key) DO UPDATE SET drained_at = "
    "CASE WHEN auth_failures.drained_at > ? THEN auth_failures.drained_at ELSE ? END + ?"
)


def add(entries: Sequence[tuple[str, bytes, float]], now: float) -> Tx[None]:
    """Add ``seconds`` to each (meter, key, seconds); forget keys drained by ``now``."""
    yield Query("DELETE FROM auth_failures WHERE drained_at <= ?", (now,))
    for meter, key, seconds in entries:
        yield Query(_ADD, (meter, key, now + seconds, now, now, seconds))


def draining(now: float) -> Tx[list[tuple[str, bytes, float]]]:
    """(meter, key, drained_at) of every key whose failures have not drained by ``now``."""
    result = yield Query(
        "SELECT meter, key, drained_at FROM auth_failures WHERE drained_at > ?", (now,)
    )
    return [(str(meter), bytes(key), float(at)) for meter, key, at in result.rows]
