"""Blob records, their links into repositories, and the garbage collector's queries
(shared by every SQL metadata index; no I/O here).

Collection and publication exclude each other: the backend runs ``link`` (with the
file's publication), ``forget`` and ``forget_unrecorded`` (with the file's removal)
under its write lock for that blob, and ``forget`` locks the blob's row (where the
dialect locks rows) before checking that no manifest references it, the same row a
manifest push locks for share while it checks that its blobs are there
(``index_tags._missing_required``): whichever comes second sees the first one's result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from registry_server.storage.index_tags import repository
from registry_server.storage.sqltx import Dialect, Query, Tx, in_marks


def link(dialect: Dialect, repo: str, digest: str, size: int) -> Tx[None]:
    repo_id = yield from repository(dialect, repo, create=True)
    # A relink restarts the blob's grace period.
    yield Query(
        "INSERT INTO blobs(digest, size, created) VALUES (?,?,?)"
        " ON CONFLICT (digest) DO UPDATE SET created = excluded.created",
        (digest, size, time.time()),
    )
    yield Query(
        "INSERT INTO blob_links(repo_id, digest) VALUES (?,?) ON CONFLICT DO NOTHING",
        (repo_id, digest),
    )


def unlink(repo: str, digest: str) -> Tx[bool]:
    row = (yield Query("SELECT id FROM repositories WHERE name = ?", (repo,))).first()
    if row is None:
        return False
    gone = yield Query(
        "DELETE FROM blob_links WHERE repo_id = ? AND digest = ?", (int(row[0]), digest)
    )
    return gone.rowcount > 0


def size(repo: str, digest: str) -> Tx[int | None]:
    row = (
        yield Query(
            "SELECT b.size FROM blob_links l JOIN repositories r ON r.id = l.repo_id"
            " JOIN blobs b ON b.digest = l.digest WHERE r.name = ? AND l.digest = ?",
            (repo, digest),
        )
    ).first()
    return int(row[0]) if row else None


def repositories_with(digest: str) -> Tx[list[str]]:
    rows = yield Query(
        "SELECT r.name FROM blob_links l JOIN repositories r ON r.id = l.repo_id"
        " WHERE l.digest = ? ORDER BY r.name",
        (digest,),
    )
    return [str(r[0]) for r in rows.rows]


# -- garbage collection ----------------------------------------------------------------


def unreferenced(older_than: float) -> Tx[list[str]]:
    rows = yield Query(
        "SELECT digest FROM blobs b WHERE created < ?"
        " AND NOT EXISTS (SELECT 1 FROM manifest_refs m WHERE m.child = b.digest)",
        (older_than,),
    )
    return [str(r[0]) for r in rows.rows]


def forget(dialect: Dialect, digest: str, older_than: float) -> Tx[bool]:
    """Remove a blob's record and links if still unreferenced and not linked since
    ``older_than``: re-checked here, a push may have linked or referenced it meanwhile."""
    row = (
        yield Query("SELECT created FROM blobs WHERE digest = ?" + dialect.lock_blob_row, (digest,))
    ).first()
    if row is None or float(row[0]) >= older_than:
        return False
    # A statement after the lock: it sees every manifest committed before it was taken.
    wanted = yield Query("SELECT 1 FROM manifest_refs WHERE child = ? LIMIT 1", (digest,))
    if wanted.first() is not None:
        return False
    yield Query("DELETE FROM blobs WHERE digest = ?", (digest,))
    yield Query("DELETE FROM blob_links WHERE digest = ?", (digest,))
    return True


def recorded(digests: Sequence[str]) -> Tx[set[str]]:
    found: set[str] = set()
    for start in range(0, len(digests), 500):
        batch = list(digests[start : start + 500])
        rows = yield Query(
            f"SELECT digest FROM blobs WHERE digest IN ({in_marks(len(batch))})", batch
        )
        found.update(str(r[0]) for r in rows.rows)
    return found


def unrecorded(digest: str) -> Tx[bool]:
    row = (yield Query("SELECT 1 FROM blobs WHERE digest = ?", (digest,))).first()
    return row is None
