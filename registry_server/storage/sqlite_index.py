"""SQLite (WAL) metadata index.

Reads run inline on the event loop: they are indexed point or range lookups that take
microseconds, and a thread hop would cost more than the query. Writes run on one
writer thread with its own connection (BEGIN IMMEDIATE, busy timeout), so a writer in
another worker process never blocks the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from registry_server.protocol import errors, versions
from registry_server.protocol.versions import Stamp
from registry_server.storage.index import (
    RETENTION_ACTOR,
    Change,
    ManifestRecord,
    NewManifest,
    TagState,
)

T = TypeVar("T")

# Plain writes queued while the writer is busy commit together, at most this many at once.
_GROUP_COMMIT_MAX = 256

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
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    PRIMARY KEY (repo_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_digest ON tags(repo_id, digest);
-- A replicated delete: remembered so an older write arriving later cannot resurrect the tag.
CREATE TABLE IF NOT EXISTS tombstones (
    repo_id INTEGER NOT NULL REFERENCES repositories(id),
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    deleted REAL NOT NULL,
    PRIMARY KEY (repo_id, name)
) WITHOUT ROWID;
-- The hybrid logical clock, shared by every worker process through the database.
CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY CHECK (id = 0), last INTEGER NOT NULL);
INSERT OR IGNORE INTO clock(id, last) VALUES (0, 0);
-- The replication log: written in the same transaction as the change it records.
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL,
    op TEXT NOT NULL,
    tag TEXT,
    digest TEXT,
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_cursors (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
-- Facts about this database: its id, made once (names the change log for receivers).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added since a database was created (CREATE IF NOT EXISTS keeps old tables)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(changes)")}
    if "actor" not in columns:
        try:
            conn.execute("ALTER TABLE changes ADD COLUMN actor TEXT")
        except sqlite3.OperationalError as exc:
            # Workers start together: another one may have added it just now.
            if "duplicate column" not in str(exc):
                raise


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SqliteIndex:
    def __init__(self, path: Path, region: str = "", peers: Sequence[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.region = region
        self.peers = tuple(peers)
        self._writer = _connect(path)
        self._writer.executescript(_SCHEMA)
        _migrate(self._writer)
        self._writer.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('instance', ?)", (uuid.uuid4().hex,)
        )
        row = self._writer.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        self.instance_id = str(row[0])
        # FULL on the writer: a committed tag survives power loss, not just a process kill.
        self._writer.execute("PRAGMA synchronous=FULL")
        for peer in self.peers:
            # A new peer starts at the end of the log; anti-entropy backfills what came before.
            self._writer.execute(
                "INSERT OR IGNORE INTO peer_cursors(peer, seq)"
                " SELECT ?, COALESCE(MAX(seq), 0) FROM changes",
                (peer,),
            )
        self._reader = _connect(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        # One transaction at a time on the writer connection, including guarded ones that
        # span several thread hops.
        self._lock = asyncio.Lock()
        # Plain writes waiting for the writer (group commit, see _write).
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._writer.close()
        self._reader.close()

    async def ping(self) -> None:
        self._reader.execute("SELECT 1 FROM repositories LIMIT 1").fetchall()

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``fn`` in a write transaction on the writer thread; returns when committed.

        Plain writes queued together share one transaction (each in its own savepoint, so
        a failing write undoes only itself): one commit, one fsync, for the whole group.
        ``before``/``after`` are storage operations done while the transaction holds the
        database write lock, so that publishing a blob file and linking it (or forgetting
        a blob and deleting its file) are atomic with respect to every other process.
        """
        loop = asyncio.get_running_loop()
        conn = self._writer
        if before is None and after is None:
            # Group commit: writes that arrive while the writer is busy share one
            # transaction, so concurrent pushes pay for one fsync instead of one each.
            done: asyncio.Future[T] = loop.create_future()
            self._queue.append((fn, done))
            if self._flusher is None:
                self._flusher = loop.create_task(self._flush())
            return await done

        async with self._lock:
            await loop.run_in_executor(self._executor, conn.execute, "BEGIN IMMEDIATE")
            try:
                if before is not None:
                    await before()
                result = await loop.run_in_executor(self._executor, fn, conn)
                if after is not None:
                    await after(result)
            except BaseException:
                await asyncio.shield(loop.run_in_executor(self._executor, conn.execute, "ROLLBACK"))
                raise
            await loop.run_in_executor(self._executor, conn.execute, "COMMIT")
            return result

    async def _flush(self) -> None:
        """Commit the queued plain writes, batch after batch, until none are left."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch = self._queue[:_GROUP_COMMIT_MAX]
                del self._queue[: len(batch)]
                batch = [(fn, done) for fn, done in batch if not done.cancelled()]
                if not batch:
                    continue
                async with self._lock:
                    try:
                        outcomes = await loop.run_in_executor(
                            self._executor, self._run_batch, [fn for fn, _ in batch]
                        )
                    except Exception as exc:  # BEGIN or COMMIT failed: none of it is stored
                        outcomes = [(False, exc)] * len(batch)
                for (_, done), (ok, value) in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if ok:
                        done.set_result(value)
                    else:
                        done.set_exception(value)
                batch = []
        except BaseException as exc:  # cancelled (shutdown): nobody may wait forever
            for _, done in [*batch, *self._queue]:
                if not done.done():
                    done.set_exception(exc)
            self._queue.clear()
            raise
        finally:
            self._flusher = None

    def _run_batch(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """One transaction; each write in a savepoint, so a failing one undoes only itself."""
        conn = self._writer
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                conn.execute("SAVEPOINT write")
                try:
                    result = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE write")
                    outcomes.append((True, result))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

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

    # -- versions and the replication log ------------------------------------------------

    @staticmethod
    def _tick(conn: sqlite3.Connection) -> int:
        last = conn.execute("SELECT last FROM clock WHERE id = 0").fetchone()[0]
        version = versions.tick(int(last), int(time.time() * 1000))
        conn.execute("UPDATE clock SET last = ? WHERE id = 0", (version,))
        return version

    @staticmethod
    def _observe(conn: sqlite3.Connection, version: int) -> None:
        conn.execute("UPDATE clock SET last = MAX(last, ?) WHERE id = 0", (version,))

    def _stamp(self, conn: sqlite3.Connection, stamp: Stamp | None) -> Stamp:
        if stamp is None:
            return Stamp(self._tick(conn), self.region)
        self._observe(conn, stamp.version)
        return stamp

    @staticmethod
    def _current(conn: sqlite3.Connection, repo_id: int, tag: str) -> Stamp | None:
        row = conn.execute(
            "SELECT version, origin FROM tags WHERE repo_id = ? AND name = ?"
            " UNION ALL SELECT version, origin FROM tombstones WHERE repo_id = ? AND name = ?",
            (repo_id, tag, repo_id, tag),
        ).fetchall()
        return max((Stamp(int(v), str(o)) for v, o in row), default=None)

    def _log(
        self,
        conn: sqlite3.Connection,
        repo: str,
        op: str,
        tag: str | None,
        digest: str | None,
        stamp: Stamp,
        actor: str | None = None,
    ) -> None:
        if self.peers:
            conn.execute(
                "INSERT INTO changes(repo, op, tag, digest, version, origin, created, actor)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (repo, op, tag, digest, stamp.version, stamp.origin, time.time(), actor),
            )

    def _tombstone(
        self,
        conn: sqlite3.Connection,
        repo_id: int,
        tag: str,
        stamp: Stamp,
        deleted: float | None = None,
    ) -> None:
        # Expiry counts from the change's own time, so every region forgets it together
        # (retention, a local decision, counts from when it removed the tag).
        when = versions.physical_ms(stamp.version) / 1000 if deleted is None else deleted
        conn.execute("DELETE FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag))
        conn.execute(
            "INSERT INTO tombstones(repo_id, name, version, origin, deleted) VALUES (?,?,?,?,?)"
            " ON CONFLICT(repo_id, name) DO UPDATE SET version=excluded.version,"
            " origin=excluded.origin, deleted=excluded.deleted",
            (repo_id, tag, stamp.version, stamp.origin, when),
        )

    # -- manifests and tags --------------------------------------------------------------

    async def put_manifest(
        self,
        repo: str,
        manifest: NewManifest,
        tags: Sequence[str],
        stamp: Stamp | None = None,
        immutable: Collection[str] = (),
        required_blobs: Sequence[str] = (),
        required_manifests: Sequence[str] = (),
        actor: str | None = None,
    ) -> list[str]:
        local = stamp is None

        def tx(conn: sqlite3.Connection) -> list[str]:
            repo_id = self._repo_id(conn, repo, create=True)
            assert repo_id is not None
            # Checked in the transaction: GC (or a delete) cannot take a blob or child away
            # between the check and the write and leave the manifest dangling.
            missing = [
                d
                for table, wanted in (
                    ("blob_links", required_blobs),
                    ("manifests", required_manifests),
                )
                for d in wanted
                if conn.execute(
                    f"SELECT 1 FROM {table} WHERE repo_id = ? AND digest = ?", (repo_id, d)
                ).fetchone()
                is None
            ]
            if missing:
                raise errors.RegistryError(
                    errors.MANIFEST_BLOB_UNKNOWN, detail={"digests": missing[:20]}
                )
            for tag in immutable if local else ():  # in the transaction: of two pushes, one wins
                row = conn.execute(
                    "SELECT digest FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag)
                ).fetchone()
                if row is not None and row[0] != manifest.digest:
                    raise errors.RegistryError(
                        errors.TAG_IMMUTABLE, detail={"tag": tag, "digest": row[0]}
                    )
            now = time.time()
            cur = conn.execute(
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
            version = self._stamp(conn, stamp)
            applied: list[str] = []
            for tag in tags:
                if not local and not self._replicated_wins(
                    conn, repo_id, tag, manifest.digest, version, tag in immutable
                ):
                    continue
                conn.execute(
                    "DELETE FROM tombstones WHERE repo_id = ? AND name = ?", (repo_id, tag)
                )
                conn.execute(
                    "INSERT INTO tags(repo_id, name, digest, updated, version, origin)"
                    " VALUES (?,?,?,?,?,?) ON CONFLICT(repo_id, name) DO UPDATE SET"
                    " digest=excluded.digest, updated=excluded.updated,"
                    " version=excluded.version, origin=excluded.origin",
                    (repo_id, tag, manifest.digest, now, version.version, version.origin),
                )
                applied.append(tag)
                if local:
                    self._log(conn, repo, "tag", tag, manifest.digest, version, actor)
            if local and not tags and cur.rowcount > 0:
                self._log(conn, repo, "manifest", None, manifest.digest, version, actor)
            return applied

        return await self._write(tx)

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

    async def delete_manifest(
        self,
        repo: str,
        digest: str,
        stamp: Stamp | None = None,
        actor: str | None = None,
        immutable: Callable[[str], bool] | None = None,
    ) -> bool:
        local = stamp is None

        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return False
            if immutable is not None:
                self._refuse_immutable(conn, repo_id, digest, immutable)
            if (
                conn.execute(
                    "SELECT 1 FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, digest)
                ).fetchone()
                is None
            ):
                return False
            version = self._stamp(conn, stamp)
            tags = conn.execute(
                "SELECT name, version, origin FROM tags WHERE repo_id = ? AND digest = ?",
                (repo_id, digest),
            ).fetchall()
            surviving = False
            for name, tag_version, tag_origin in tags:
                if versions.wins(version, Stamp(int(tag_version), str(tag_origin))):
                    self._tombstone(conn, repo_id, name, version)
                else:
                    surviving = True  # a newer tag elsewhere still wants this manifest
            if surviving:
                return True
            conn.execute(
                "DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
            conn.execute(
                "DELETE FROM manifest_refs WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
            if local:
                self._log(conn, repo, "delete_manifest", None, digest, version, actor)
            return True

        return await self._write(tx)

    def _replicated_wins(
        self,
        conn: sqlite3.Connection,
        repo_id: int,
        tag: str,
        digest: str,
        incoming: Stamp,
        immutable: bool,
    ) -> bool:
        """Whether a replicated tag change applies: the last writer wins, except that an
        immutable tag pushed in two regions at once keeps its first push everywhere."""
        if immutable:
            row = conn.execute(
                "SELECT digest, version, origin FROM tags WHERE repo_id = ? AND name = ?",
                (repo_id, tag),
            ).fetchone()
            if row is not None and str(row[0]) != digest:
                return incoming < Stamp(int(row[1]), str(row[2]))
        return versions.wins(incoming, self._current(conn, repo_id, tag))

    @staticmethod
    def _refuse_immutable(
        conn: sqlite3.Connection, repo_id: int, digest: str, immutable: Callable[[str], bool]
    ) -> None:
        """The manifest, and every index above it, must carry no immutable tag."""
        seen: set[str] = set()
        frontier = [digest]
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            for (tag,) in conn.execute(
                "SELECT name FROM tags WHERE repo_id = ? AND digest = ?", (repo_id, current)
            ):
                if immutable(str(tag)):
                    raise errors.RegistryError(
                        errors.TAG_IMMUTABLE, detail={"tag": str(tag), "digest": current}
                    )
            frontier.extend(
                str(parent)
                for (parent,) in conn.execute(
                    "SELECT digest FROM manifest_refs"
                    " WHERE repo_id = ? AND child = ? AND kind = 'manifest'",
                    (repo_id, current),
                )
            )

    async def delete_tag(
        self, repo: str, tag: str, stamp: Stamp | None = None, actor: str | None = None
    ) -> bool:
        local = stamp is None

        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=stamp is not None)
            if repo_id is None:
                return False
            exists = (
                conn.execute(
                    "SELECT 1 FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag)
                ).fetchone()
                is not None
            )
            if local and not exists:
                return False
            version = self._stamp(conn, stamp)
            if not local and not versions.wins(version, self._current(conn, repo_id, tag)):
                return exists
            self._tombstone(conn, repo_id, tag, version)
            if local:
                self._log(conn, repo, "delete_tag", tag, None, version, actor)
            return True

        return await self._write(tx)

    async def expire_tag(self, repo: str, tag: str, version: int) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return False
            row = conn.execute(
                "SELECT version, origin FROM tags WHERE repo_id = ? AND name = ?",
                (repo_id, tag),
            ).fetchone()
            if row is None or int(row[0]) != version:
                return False  # pushed again (or deleted) since it was chosen: keep it
            own = Stamp(int(row[0]), str(row[1]))
            self._tombstone(conn, repo_id, tag, own, deleted=time.time())
            self._log(conn, repo, "expire_tag", tag, None, own, RETENTION_ACTOR)
            return True

        return await self._write(tx)

    async def delete_untagged_manifest(self, repo: str, digest: str) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            repo_id = self._repo_id(conn, repo, create=False)
            if repo_id is None:
                return 0
            deleted = 0
            pending = [digest]
            while pending:
                current = pending.pop()
                held = conn.execute(
                    "SELECT 1 FROM tags WHERE repo_id = ? AND digest = ?"
                    " UNION ALL SELECT 1 FROM manifest_refs"
                    " WHERE repo_id = ? AND child = ? AND kind = 'manifest' LIMIT 1",
                    (repo_id, current, repo_id, current),
                ).fetchone()
                if held is not None:
                    continue
                children = [
                    str(r[0])
                    for r in conn.execute(
                        "SELECT child FROM manifest_refs"
                        " WHERE repo_id = ? AND digest = ? AND kind = 'manifest'",
                        (repo_id, current),
                    )
                ]
                gone = conn.execute(
                    "DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, current)
                ).rowcount
                if not gone:
                    continue
                conn.execute(
                    "DELETE FROM manifest_refs WHERE repo_id = ? AND digest = ?",
                    (repo_id, current),
                )
                stamp = self._stamp(conn, None)
                self._log(conn, repo, "expire_manifest", None, current, stamp, RETENTION_ACTOR)
                deleted += 1
                pending.extend(children)  # an index's platforms go with it
            return deleted

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

    def _missing(self, table: str, repo: str, digests: Sequence[str]) -> list[str]:
        """The digests with no row in ``table`` (manifests or blob_links) for ``repo``."""
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return list(digests)
        query = f"SELECT 1 FROM {table} WHERE repo_id = ? AND digest = ?"
        return [d for d in digests if self._reader.execute(query, (repo_id, d)).fetchone() is None]

    async def missing_manifests(self, repo: str, digests: Sequence[str]) -> list[str]:
        return self._missing("manifests", repo, digests)

    # -- blobs ---------------------------------------------------------------------------

    async def link_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            repo_id = self._repo_id(conn, repo, create=True)
            # A relink restarts the blob's grace period.
            conn.execute(
                "INSERT INTO blobs(digest, size, created) VALUES (?,?,?)"
                " ON CONFLICT(digest) DO UPDATE SET created=excluded.created",
                (digest, size, time.time()),
            )
            conn.execute(
                "INSERT OR IGNORE INTO blob_links(repo_id, digest) VALUES (?,?)", (repo_id, digest)
            )

        await self._write(tx, before=publish)

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
        return self._missing("blob_links", repo, digests)

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
            " AND NOT EXISTS (SELECT 1 FROM manifest_refs m WHERE m.child = b.digest)",
            (older_than,),
        ).fetchall()
        return [r[0] for r in rows]

    async def forget_blob(
        self, digest: str, older_than: float, remove: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            # Re-checked under the write lock: a push may have linked it again meanwhile.
            cur = conn.execute(
                "DELETE FROM blobs WHERE digest = ? AND created < ?"
                " AND NOT EXISTS (SELECT 1 FROM manifest_refs m WHERE m.child = ?)",
                (digest, older_than, digest),
            )
            if cur.rowcount == 0:
                return False
            conn.execute("DELETE FROM blob_links WHERE digest = ?", (digest,))
            return True

        async def after(forgotten: bool) -> None:
            if forgotten and remove is not None:
                await remove()

        return await self._write(tx, after=after)

    async def locked(self, action: Callable[[], Awaitable[None]]) -> None:
        def nothing(conn: sqlite3.Connection) -> None:
            return None

        await self._write(nothing, before=action)

    async def recorded_blobs(self, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(digests), 500):
            batch = list(digests[start : start + 500])
            marks = ",".join("?" * len(batch))
            rows = self._reader.execute(
                f"SELECT digest FROM blobs WHERE digest IN ({marks})", batch
            ).fetchall()
            found.update(str(r[0]) for r in rows)
        return found

    async def forget_unrecorded(self, digest: str, remove: Callable[[], Awaitable[None]]) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone()
            return row is None

        async def after(unrecorded: bool) -> None:
            if unrecorded:
                await remove()

        return await self._write(tx, after=after)

    # -- replication ---------------------------------------------------------------------

    async def pending_changes(self, peer: str, limit: int) -> list[Change]:
        rows = self._reader.execute(
            "SELECT c.seq, c.repo, c.op, c.tag, c.digest, c.version, c.origin, c.created,"
            " c.actor FROM changes c JOIN peer_cursors p ON p.peer = ? WHERE c.seq > p.seq"
            " ORDER BY c.seq LIMIT ?",
            (peer, limit),
        ).fetchall()
        return [Change(*r) for r in rows]

    async def ack_change(self, peer: str, seq: int) -> None:
        peers = self.peers

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE peer_cursors SET seq = MAX(seq, ?) WHERE peer = ?", (seq, peer))
            # Entries every configured peer has are no longer needed.
            marks = ",".join("?" * len(peers))
            conn.execute(
                f"DELETE FROM changes WHERE seq <= (SELECT MIN(seq) FROM peer_cursors"
                f" WHERE peer IN ({marks}))",
                peers,
            )

        await self._write(tx)

    async def queue_stats(self, peer: str) -> tuple[int, float | None]:
        row = self._reader.execute(
            "SELECT COUNT(*), MIN(c.created) FROM changes c JOIN peer_cursors p ON p.peer = ?"
            " WHERE c.seq > p.seq",
            (peer,),
        ).fetchone()
        return int(row[0]), (float(row[1]) if row[1] is not None else None)

    # Tag states (tombstones included) and referrer digests: what anti-entropy compares.
    _TAG_STATES = (
        "SELECT name, digest, version, origin FROM tags WHERE repo_id = ?"
        " UNION ALL SELECT name, NULL, version, origin FROM tombstones WHERE repo_id = ?"
        " ORDER BY 1"
    )
    _REFERRERS = (
        "SELECT digest FROM manifests WHERE repo_id = ? AND subject IS NOT NULL ORDER BY digest"
    )

    async def repository_hash(self, repo: str) -> str | None:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return None
        h = hashlib.sha256()
        for row in self._reader.execute(self._TAG_STATES, (repo_id, repo_id)):
            h.update(repr(tuple(row)).encode())
        for (digest,) in self._reader.execute(self._REFERRERS, (repo_id,)):
            h.update(digest.encode())
        return h.hexdigest()

    async def tag_states(self, repo: str) -> list[TagState]:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return []
        rows = self._reader.execute(self._TAG_STATES, (repo_id, repo_id)).fetchall()
        return [TagState(str(n), d, int(v), str(o)) for n, d, v, o in rows]

    async def referrer_digests(self, repo: str) -> list[str]:
        repo_id = self._read_repo_id(repo)
        if repo_id is None:
            return []
        return [str(r[0]) for r in self._reader.execute(self._REFERRERS, (repo_id,)).fetchall()]

    async def expire_tombstones(self, older_than: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM tombstones WHERE deleted < ?", (older_than,)).rowcount

        return await self._write(tx)
