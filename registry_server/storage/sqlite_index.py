"""SQLite (WAL) metadata index.

Reads run inline on the event loop: they are indexed point or range lookups that take
microseconds, and a thread hop would cost more than the query. Writes run on one
writer thread with its own connection (BEGIN IMMEDIATE, busy timeout), so a writer in
another worker process never blocks the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from registry_server.storage.index import ManifestRecord, NewManifest

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repositories (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_links (
    repo_id INTEGER NOT NULL REFERENCES repositories(id),
    digest TEXT NOT NULL,
    PRIMARY KEY (repo_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_links_digest ON blob_links(digest);
CREATE TABLE IF NOT EXISTS manifests (
    repo_id INTEGER NOT NULL REFERENCES repositories(id),
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    content BLOB NOT NULL,
    artifact_type TEXT,
    subject TEXT,
    annotations TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (repo_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifests_subject ON manifests(repo_id, subject)
    WHERE subject IS NOT NULL;
CREATE TABLE IF NOT EXISTS manifest_refs (
    repo_id INTEGER NOT NULL,
    digest TEXT NOT NULL,
    child TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, digest, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs(child);
CREATE TABLE IF NOT EXISTS tags (
    repo_id INTEGER NOT NULL REFERENCES repositories(id),
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (repo_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_digest ON tags(repo_id, digest);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SqliteIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = _connect(path)
        self._writer.executescript(_SCHEMA)
        # FULL on the writer: a committed tag survives power loss, not just a process kill.
        self._writer.execute("PRAGMA synchronous=FULL")
        self._reader = _connect(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._writer.close()
        self._reader.close()

    async def ping(self) -> None:
        self._reader.execute("SELECT 1 FROM repositories LIMIT 1").fetchall()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _repo_id(conn: sqlite3.Connection, repo: str, create: bool) -> int | None:
        row = conn.execute("SELECT id FROM repositories WHERE name = ?", (repo,)).fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            return None
        cur = conn.execute(
            "INSERT INTO repositories(name, created) VALUES (?, ?)", (repo, time.time())
        )
        return int(cur.lastrowid or 0)

    def _read_repo_id(self, repo: str) -> int | None:
        return self._repo_id(self._reader, repo, create=False)

    # -- manifests and tags --------------------------------------------------------------

    async def put_manifest(self, repo: str, manifest: NewManifest, tags: Sequence[str]) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            repo_id = self._repo_id(conn, repo, create=True)
            now = time.time()
            conn.execute(
                "INSERT OR IGNORE INTO manifests(repo_id, digest, media_type, size, content,"
                " artifact_type, subject, annotations, created) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    repo_id,
                    manifest.digest,
                    manifest.media_type,
                    len(manifest.content),
                    manifest.content,
                    manifest.artifact_type,
                    manifest.subject,
                    manifest.annotations,
                    now,
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO manifest_refs(repo_id, digest, child, kind)"
                " VALUES (?,?,?,?)",
                [(repo_id, manifest.digest, d, "blob") for d in manifest.blob_refs]
                + [(repo_id, manifest.digest, d, "manifest") for d in manifest.child_refs],
            )
            conn.executemany(
                "INSERT INTO tags(repo_id, name, digest, updated) VALUES (?,?,?,?)"
                " ON CONFLICT(repo_id, name) DO UPDATE SET digest=excluded.digest,"
                " updated=excluded.updated",
                [(repo_id, t, manifest.digest, now) for t in tags],
            )

        await self._write(tx)

    async def get_manifest(
        self, repo: str, digest: str, content: bool = True
    ) -> ManifestRecord | None:
        column = "m.content" if content else "NULL"
        row = self._reader.execute(
            f"SELECT m.digest, m.media_type, m.size, {column}, m.artifact_type, m.subject,"
            " m.annotations FROM manifests m JOIN repositories r ON r.id = m.repo_id"
            " WHERE r.name = ? AND m.digest = ?",
            (repo, digest),
        ).fetchone()
        return ManifestRecord(*row) if row else None

    async def resolve_tag(self, repo: str, tag: str) -> str | None:
        row = self._reader.execute(
            "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id"
            " WHERE r.name = ? AND t.name = ?",
            (repo, tag),
        ).fetchone()
        return str(row[0]) if row else None

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return False
            cur = conn.execute(
                "DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
            if cur.rowcount == 0:
                return False
            conn.execute(
                "DELETE FROM manifest_refs WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
            conn.execute("DELETE FROM tags WHERE repo_id = ? AND digest = ?", (repo_id, digest))
            return True

        return await self._write(tx)

    async def delete_tag(self, repo: str, tag: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return False
            cur = conn.execute("DELETE FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag))
            return cur.rowcount > 0

        return await self._write(tx)

    async def list_tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return None
        rows = self._reader.execute(
            "SELECT name FROM tags WHERE repo_id = ? AND name > ? ORDER BY name LIMIT ?",
            (repo_id, last or "", -1 if n is None else n),
        ).fetchall()
        return [r[0] for r in rows]

    async def list_repositories(self, n: int | None, last: str | None) -> list[str]:
        rows = self._reader.execute(
            "SELECT name FROM repositories WHERE name > ? ORDER BY name LIMIT ?",
            (last or "", -1 if n is None else n),
        ).fetchall()
        return [r[0] for r in rows]

    async def referrers(self, repo: str, subject: str) -> list[ManifestRecord]:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return []
        rows = self._reader.execute(
            "SELECT digest, media_type, size, NULL, artifact_type, subject, annotations"
            " FROM manifests WHERE repo_id = ? AND subject = ? ORDER BY digest",
            (repo_id, subject),
        ).fetchall()
        return [ManifestRecord(*r) for r in rows]

    async def missing_manifests(self, repo: str, digests: Sequence[str]) -> list[str]:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return list(digests)
        return [
            d
            for d in digests
            if self._reader.execute(
                "SELECT 1 FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, d)
            ).fetchone()
            is None
        ]

    # -- blobs ---------------------------------------------------------------------------

    async def link_blob(self, repo: str, digest: str, size: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            repo_id = self._repo_id(conn, repo, create=True)
            conn.execute(
                "INSERT OR IGNORE INTO blobs(digest, size, created) VALUES (?,?,?)",
                (digest, size, time.time()),
            )
            conn.execute(
                "INSERT OR IGNORE INTO blob_links(repo_id, digest) VALUES (?,?)", (repo_id, digest)
            )

        await self._write(tx)

    async def blob_size(self, repo: str, digest: str) -> int | None:
        row = self._reader.execute(
            "SELECT b.size FROM blob_links l JOIN repositories r ON r.id = l.repo_id"
            " JOIN blobs b ON b.digest = l.digest WHERE r.name = ? AND l.digest = ?",
            (repo, digest),
        ).fetchone()
        return int(row[0]) if row else None

    async def unlink_blob(self, repo: str, digest: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return False
            cur = conn.execute(
                "DELETE FROM blob_links WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
            return cur.rowcount > 0

        return await self._write(tx)

    async def missing_blobs(self, repo: str, digests: Sequence[str]) -> list[str]:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return list(digests)
        return [
            d
            for d in digests
            if self._reader.execute(
                "SELECT 1 FROM blob_links WHERE repo_id = ? AND digest = ?", (repo_id, d)
            ).fetchone()
            is None
        ]

    async def repositories_with_blob(self, digest: str) -> list[str]:
        rows = self._reader.execute(
            "SELECT r.name FROM blob_links l JOIN repositories r ON r.id = l.repo_id"
            " WHERE l.digest = ? ORDER BY r.name",
            (digest,),
        ).fetchall()
        return [r[0] for r in rows]

    # -- garbage collection --------------------------------------------------------------

    async def unreferenced_blobs(self, older_than: float) -> list[str]:
        rows = self._reader.execute(
            "SELECT digest FROM blobs b WHERE created < ?"
            " AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest)"
            " AND NOT EXISTS (SELECT 1 FROM manifest_refs m WHERE m.child = b.digest)",
            (older_than,),
        ).fetchall()
        return [r[0] for r in rows]

    async def forget_blob(self, digest: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM blobs WHERE digest = ?"
                " AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = ?)"
                " AND NOT EXISTS (SELECT 1 FROM manifest_refs m WHERE m.child = ?)",
                (digest, digest, digest),
            )
            return cur.rowcount > 0

        return await self._write(tx)
