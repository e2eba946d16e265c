"""Web UI sessions ended by logging out, shared through the metadata index (no I/O here).

A session is a signed token valid on every process until it expires, so logging out has
to be known to every process: one row per ended session (its token id), kept until the
token would have expired anyway. Each process reads the rows ended since it last looked
(``auth/session_ends.py``); expired rows are removed by whoever ends the next session.
"""

from __future__ import annotations

from registry_server.storage.sqltx import Query, Tx

# The same statement in both engines' SQL (PostgreSQL's is a migration).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ended_sessions (
    token_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ended_sessions_ended ON ended_sessions (ended_at);
"""


def end(token_id: str, expires_at: float, now: float) -> Tx[None]:
    """Record the session ended at ``now``; forget those expired by then."""
    yield Query("DELETE FROM ended_sessions WHERE expires_at <= ?", (now,))
    yield Query(
        "INSERT INTO ended_sessions (token_id, expires_at, ended_at) VALUES (?, ?, ?) "
        "ON CONFLICT (token_id) DO NOTHING",
        (token_id, expires_at, now),
    )


def ended_since(since: float) -> Tx[list[tuple[str, float]]]:
    """(token id, expires at) of the sessions ended after ``since``."""
    result = yield Query(
        "SELECT token_id, expires_at FROM ended_sessions WHERE ended_at > ?", (since,)
    )
    return [(str(token_id), float(expires)) for token_id, expires in result.rows]
