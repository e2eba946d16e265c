"""Per-repository usage: kept by triggers in the push and delete transactions (created
by ``sqlite_index`` and migration 5 of ``postgres_schema``), read and recounted here
(shared by every SQL index; no I/O).

What counts is decided in ``protocol/quotas.py``. Triggers keep it, not the Python
transactions, so that every writer of a manifest, a reference or a tag counts (the
index rebuild, retention, a replica of an older version during a rolling update).
``repository_blobs`` holds, per repository and blob, how many of its manifests
reference the blob and the size counted when the first one did: the figure always
goes down by exactly what it went up by. A repository's row is locked by every writer
of its manifests and tags (``index_tags.repository``), so the counts of concurrent
transactions never interleave.
"""

from __future__ import annotations

from registry_server.protocol.quotas import Usage
from registry_server.storage.sqltx import Dialect, Query, Tx

# Counting what is already stored, for a SQLite database from before usage was kept
# (PostgreSQL's migration 5 runs the same statements).
RECOUNT_ALL = (
    "DELETE FROM repository_blobs",
    "INSERT INTO repository_blobs(repo_id, digest, size, refs)"
    " SELECT r.repo_id, r.child, COALESCE(MAX(b.size), 0), COUNT(*)"
    " FROM manifest_refs r LEFT JOIN blobs b ON b.digest = r.child"
    " WHERE r.kind = 'blob' GROUP BY r.repo_id, r.child",
    "UPDATE repositories SET"
    " stored_bytes = COALESCE((SELECT SUM(size) FROM repository_blobs"
    " WHERE repo_id = repositories.id), 0)"
    " + COALESCE((SELECT SUM(size) FROM manifests WHERE repo_id = repositories.id), 0),"
    " tag_count = (SELECT COUNT(*) FROM tags WHERE repo_id = repositories.id),"
    " manifest_count = (SELECT COUNT(*) FROM manifests WHERE repo_id = repositories.id)",
)


def recount_all() -> Tx[None]:
    for statement in RECOUNT_ALL:
        yield Query(statement)


_USAGE = "SELECT name, stored_bytes, tag_count, manifest_count FROM repositories"


def _usage(row: tuple[object, ...]) -> Usage:
    name, storage, tags, manifests = row
    return Usage(str(name), int(str(storage)), int(str(tags)), int(str(manifests)))


def usage(repo: str) -> Tx[Usage | None]:
    row = (yield Query(f"{_USAGE} WHERE name = ?", (repo,))).first()
    return None if row is None else _usage(row)


def usage_of(repo_id: int) -> Tx[Usage]:
    """A repository's usage inside a write (the caller holds its row)."""
    row = (yield Query(f"{_USAGE} WHERE id = ?", (repo_id,))).first()
    assert row is not None
    return _usage(row)


def usages(dialect: Dialect, n: int | None, last: str | None) -> Tx[list[Usage]]:
    rows = yield Query(
        f"{_USAGE} WHERE name > ? ORDER BY name LIMIT ?", (last or "", dialect.limit(n))
    )
    return [_usage(row) for row in rows.rows]


def _like(text: str) -> str:
    """A LIKE pattern matching names that contain ``text`` (``\\`` escapes)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def listing(
    dialect: Dialect, n: int | None, last: str | None, contains: str = ""
) -> Tx[list[tuple[Usage, float | None]]]:
    """Repositories in name order after ``last`` whose name contains ``contains``, with
    their usage and when a tag of theirs was last pushed (the UI's repository page)."""
    where, params = "name > ?", [last or ""]
    if contains:
        where += " AND name LIKE ? ESCAPE '\\'"
        params.append(_like(contains))
    rows = yield Query(
        "SELECT name, stored_bytes, tag_count, manifest_count,"
        " (SELECT MAX(updated) FROM tags WHERE repo_id = repositories.id)"
        f" FROM repositories WHERE {where} ORDER BY name LIMIT ?",
        (*params, dialect.limit(n)),
    )
    return [(_usage(row[:4]), None if row[4] is None else float(row[4])) for row in rows.rows]


def recount(repo: str) -> Tx[Usage | None]:
    """A repository's usage counted from scratch from its manifests, references and
    tags, ignoring the kept figures: what they must equal (verification, tests)."""
    row = (yield Query("SELECT id FROM repositories WHERE name = ?", (repo,))).first()
    if row is None:
        return None
    repo_id = int(row[0])
    counted = (
        yield Query(
            "SELECT COALESCE((SELECT SUM(b.size) FROM blobs b WHERE b.digest IN"
            " (SELECT child FROM manifest_refs WHERE repo_id = ? AND kind = 'blob')), 0)"
            " + COALESCE((SELECT SUM(size) FROM manifests WHERE repo_id = ?), 0),"
            " (SELECT COUNT(*) FROM tags WHERE repo_id = ?),"
            " (SELECT COUNT(*) FROM manifests WHERE repo_id = ?)",
            (repo_id, repo_id, repo_id, repo_id),
        )
    ).first()
    assert counted is not None
    return _usage((repo, *counted))
