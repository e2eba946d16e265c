"""SQLite (WAL) metadata index: the embedded default, one pod.

Reads run inline on the event loop: they are indexed point or range lookups that take
microseconds, and a thread hop would cost more than the query. Writes run on one
writer thread with its own connection (BEGIN IMMEDIATE, busy timeout, group commit:
``sqlite_writer``), so a writer in another worker process never blocks the loop. The
transactions themselves are shared with the other SQL backends (``sql_index``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from registry_server.storage import auth_failures, changelog, ended_sessions, index_usage
from registry_server.storage.driver import StorageFull
from registry_server.storage.space import SpaceMonitor
from registry_server.storage.sql_index import SqlIndex
from registry_server.storage.sqlite_writer import SqliteWriter
from registry_server.storage.sqltx import Dialect, Tx, run_sync

T = TypeVar("T")

_SQLITE_FULL = 13  # SQLITE_FULL, the primary result code of "database or disk is full"


def _disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc)


# One writer holds the whole database: no row locks, one clock for every repository.
DIALECT = Dialect(
    name="sqlite",
    unlimited=-1,
    lock_repository="",
    share_blob_rows="",
    lock_blob_row="",
    per_repository_clock=False,
    now="((julianday('now') - 2440587.5) * 86400.0)",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repositories (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    -- Counts the changes to this repository's tags: what a cached tag list is valid for.
    tags_changed INTEGER NOT NULL DEFAULT 0,
    -- Usage (protocol/quotas.py), kept by the triggers of index_usage.
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    tag_count INTEGER NOT NULL DEFAULT 0,
    manifest_count INTEGER NOT NULL DEFAULT 0
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
-- A referrer deleted by digest: anti-entropy must not bring back an older copy of it.
CREATE TABLE IF NOT EXISTS referrer_tombstones (
    repo_id INTEGER NOT NULL REFERENCES repositories(id),
    digest TEXT NOT NULL,
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    deleted REAL NOT NULL,
    PRIMARY KEY (repo_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS referrer_tombstones_deleted ON referrer_tombstones(deleted);
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


_ADDED_COLUMNS = (
    ("changes", "actor", "TEXT"),
    ("repositories", "tags_changed", "INTEGER NOT NULL DEFAULT 0"),
    ("repositories", "stored_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("repositories", "tag_count", "INTEGER NOT NULL DEFAULT 0"),
    ("repositories", "manifest_count", "INTEGER NOT NULL DEFAULT 0"),
    # Existing rows count as let go of now (when their tags last moved is not known):
    # a constant default, so no row is rewritten.
    ("manifests", "released", "REAL DEFAULT {now}"),
    # A referrer's clock version when it was first stored (NULL: stored before it was
    # kept; its ``created`` stands in): what a delete of it by digest is compared with.
    ("manifests", "stored_version", "INTEGER"),
    # When a replica that has the consumer configured last registered or moved its cursor.
    ("peer_cursors", "seen", "REAL NOT NULL DEFAULT 0"),
)


_NOW = DIALECT.now

# Every insert, update or delete of a tag row counts in its repository's row: a cached
# tag list is valid while the count holds (services/tag_lists.py). When a manifest loses
# a tag, an index listing it or its subject, it is stamped ``released``: the retention of
# untagged manifests counts from then (index_tags.untagged_manifests). Created after
# _migrate, which adds the columns to older databases.
_TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS tags_changed_insert AFTER INSERT ON tags BEGIN
    UPDATE repositories SET tags_changed = tags_changed + 1 WHERE id = NEW.repo_id;
END;
CREATE TRIGGER IF NOT EXISTS tags_changed_update AFTER UPDATE ON tags BEGIN
    UPDATE repositories SET tags_changed = tags_changed + 1 WHERE id = NEW.repo_id;
END;
CREATE TRIGGER IF NOT EXISTS tags_changed_delete AFTER DELETE ON tags BEGIN
    UPDATE repositories SET tags_changed = tags_changed + 1 WHERE id = OLD.repo_id;
END;
CREATE TRIGGER IF NOT EXISTS released_tag_moved AFTER UPDATE OF digest ON tags
WHEN OLD.digest != NEW.digest BEGIN
    UPDATE manifests SET released = {_NOW} WHERE repo_id = OLD.repo_id AND digest = OLD.digest;
END;
CREATE TRIGGER IF NOT EXISTS released_tag_deleted AFTER DELETE ON tags BEGIN
    UPDATE manifests SET released = {_NOW} WHERE repo_id = OLD.repo_id AND digest = OLD.digest;
END;
CREATE TRIGGER IF NOT EXISTS released_listing_deleted AFTER DELETE ON manifest_refs
WHEN OLD.kind = 'manifest' BEGIN
    UPDATE manifests SET released = {_NOW} WHERE repo_id = OLD.repo_id AND digest = OLD.child;
END;
CREATE TRIGGER IF NOT EXISTS released_subject_deleted AFTER DELETE ON manifests BEGIN
    UPDATE manifests SET released = {_NOW} WHERE repo_id = OLD.repo_id AND subject = OLD.digest;
END;
"""


_BLOB_SIZE = "COALESCE((SELECT size FROM blobs WHERE digest = NEW.child), 0)"

# Usage (storage/index_usage.py): statements run one by one in the transaction that
# counts what is already stored.
_USAGE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS repository_blobs (
        repo_id INTEGER NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        refs INTEGER NOT NULL,
        PRIMARY KEY (repo_id, digest)
    ) WITHOUT ROWID""",
    f"""CREATE TRIGGER IF NOT EXISTS usage_ref_insert AFTER INSERT ON manifest_refs
    WHEN NEW.kind = 'blob' BEGIN
        UPDATE repositories SET stored_bytes = stored_bytes + {_BLOB_SIZE}
            WHERE id = NEW.repo_id AND NOT EXISTS (SELECT 1 FROM repository_blobs
                WHERE repo_id = NEW.repo_id AND digest = NEW.child);
        INSERT INTO repository_blobs(repo_id, digest, size, refs)
            VALUES (NEW.repo_id, NEW.child, {_BLOB_SIZE}, 1)
            ON CONFLICT (repo_id, digest) DO UPDATE SET refs = refs + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_ref_delete AFTER DELETE ON manifest_refs
    WHEN OLD.kind = 'blob' BEGIN
        UPDATE repository_blobs SET refs = refs - 1
            WHERE repo_id = OLD.repo_id AND digest = OLD.child;
        UPDATE repositories SET stored_bytes = stored_bytes - (SELECT size
            FROM repository_blobs WHERE repo_id = OLD.repo_id AND digest = OLD.child)
            WHERE id = OLD.repo_id AND EXISTS (SELECT 1 FROM repository_blobs
                WHERE repo_id = OLD.repo_id AND digest = OLD.child AND refs <= 0);
        DELETE FROM repository_blobs
            WHERE repo_id = OLD.repo_id AND digest = OLD.child AND refs <= 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_manifest_insert AFTER INSERT ON manifests BEGIN
        UPDATE repositories SET manifest_count = manifest_count + 1,
            stored_bytes = stored_bytes + NEW.size WHERE id = NEW.repo_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_manifest_delete AFTER DELETE ON manifests BEGIN
        UPDATE repositories SET manifest_count = manifest_count - 1,
            stored_bytes = stored_bytes - OLD.size WHERE id = OLD.repo_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_tag_insert AFTER INSERT ON tags BEGIN
        UPDATE repositories SET tag_count = tag_count + 1 WHERE id = NEW.repo_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_tag_delete AFTER DELETE ON tags BEGIN
        UPDATE repositories SET tag_count = tag_count - 1 WHERE id = OLD.repo_id;
    END""",
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added since a database was created (CREATE IF NOT EXISTS keeps old tables)."""
    for table, column, declaration in _ADDED_COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in columns:
            continue
        try:
            declared = declaration.format(now=repr(time.time()))
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declared}")
        except sqlite3.OperationalError as exc:
            # Workers start together: another one may have added it just now.
            if "duplicate column" not in str(exc):
                raise


def _count_usage(conn: sqlite3.Connection) -> None:
    """Create the usage table and triggers and count what is already stored, once per
    database, in one transaction: workers starting together count it once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'usage'").fetchone() is None:
            for statement in _USAGE_SCHEMA:
                conn.execute(statement)
            run_sync(conn, index_usage.recount_all())
            conn.execute("INSERT INTO meta(key, value) VALUES ('usage', '1')")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _enter_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switch to WAL, waiting out the other workers opening the same new database.

    Changing the journal mode needs the database to itself, and SQLite may answer
    "database is locked" at once instead of calling the busy handler (seen when
    two workers create a fresh index together), so this waits on its own.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    _enter_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SqliteIndex(SqlIndex):
    dialect = DIALECT

    def __init__(
        self,
        path: Path,
        region: str = "",
        peers: Sequence[str] = (),
        space: SpaceMonitor | None = None,
    ) -> None:
        super().__init__(region, peers)
        # The volume's gate and reserve: a delete that cannot commit for want of space
        # releases the reserve and is tried again.
        self.space = space
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        conn = _connect(path)
        conn.executescript(_SCHEMA)
        conn.executescript(auth_failures.SQLITE_SCHEMA)
        conn.executescript(ended_sessions.SQLITE_SCHEMA)
        _migrate(conn)
        conn.executescript(_TRIGGERS)
        _count_usage(conn)
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('instance', ?)", (uuid.uuid4().hex,)
        )
        row = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        self.instance_id = str(row[0])
        # FULL on the writer: a committed tag survives power loss, not just a process kill.
        conn.execute("PRAGMA synchronous=FULL")
        run_sync(conn, changelog.register(self.peers))
        self._writer = SqliteWriter(conn)
        self._reader = _connect(path)

    async def close(self) -> None:
        self._writer.close()
        self._reader.close()

    async def ping(self) -> None:
        self._reader.execute("SELECT 1 FROM repositories LIMIT 1").fetchall()

    async def _read(self, tx: Tx[T]) -> T:
        return run_sync(self._reader, tx)

    async def _write(
        self,
        tx: Callable[[], Tx[T]],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
        blob: str | None = None,
        frees: bool = False,
    ) -> T:
        # BEGIN IMMEDIATE holds the whole database: every blob's lock at once.
        try:
            return await self._writer.write(
                lambda conn: run_sync(conn, tx()), before, after, key=blob
            )
        except sqlite3.Error as exc:
            if not _disk_full(exc):
                raise
            space = self.space
            if space is not None:
                space.note_full()
            # Only a write that frees space may spend the reserve, once: a retried guarded
            # write re-runs actions that are idempotent for deletes (a second discard or
            # removal finds nothing), never a publish.
            if not (frees and space is not None and await asyncio.to_thread(space.release_reserve)):
                raise StorageFull(str(exc)) from None
        try:
            return await self._writer.write(
                lambda conn: run_sync(conn, tx()), before, after, key=blob
            )
        except sqlite3.Error as exc:
            if _disk_full(exc):
                raise StorageFull(str(exc)) from None
            raise
