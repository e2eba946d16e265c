"""Web UI sessions ended by logging out, shared through the metadata index (no I/O here).

A session is a signed token valid on every process until it expires, so logging out has
to be known to every process: one row per ended session (its token id), kept until the
token would have expired anyway. Each process reads the rows ended since it last looked
(``auth/session_ends.py``); expired rows are removed by whoever ends the next session.
"""

from __future__ import annotations

from registry_server.storage.sqltx import Dialect, Query, Tx

# The same statement in both engines' SQL (PostgreSQL's is a migration).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ended_sessions (
    token_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ended_sessions_ended ON ended_sessions (ended_at);
"""


def end(dialect: Dialect, token_id: str, expires_at: float) -> Tx[None]:
    """Record the session ended now, by the database's clock (every process reads it by
    that one clock, whatever its own says); forget those expired by then."""
    yield Query(f"DELETE FROM ended_sessions WHERE expires_at <= {dialect.now}", ())
    yield Query(
        "INSERT INTO ended_sessions (token_id, expires_at, ended_at)"
        f" VALUES (?, ?, {dialect.now}) ON CONFLICT (token_id) DO NOTHING",
        (token_id, expires_at),
    )


def ended_since(dialect: Dialect, since: float | None) -> Tx[tuple[list[tuple[str, float]], float]]:
    """(token id, expires at) of the sessions ended after ``since`` (None: all), and the
    database's clock as the read began: where the next read may start from."""
    now = (yield Query(f"SELECT {dialect.now}", ())).first()
    assert now is not None
    result = yield Query(
        "SELECT token_id, expires_at FROM ended_sessions WHERE ended_at > ?",
        (-1.0 if since is None else since,),
    )
    return [(str(token_id), float(expires)) for token_id, expires in result.rows], float(now[0])
