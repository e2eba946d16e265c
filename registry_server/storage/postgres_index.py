"""PostgreSQL metadata index: one database shared by every replica and worker process.

The transactions are the ones SQLite runs (``sql_index``, ``index_tags``,
``index_blobs``, ``changelog``); this module runs them on a pool of async connections
and supplies what SQLite's single writer gave for free.

Why psycopg 3 (``psycopg[binary]`` + ``psycopg-pool``) rather than asyncpg: it is fully
typed (``mypy --strict`` checks our calls, asyncpg ships no annotations), one library
serves both the async runtime and the synchronous start-up (migrations run before the
event loop exists, where SQLite creates its schema too), its pool is maintained by the
same project, and the binary wheel bundles libpq, so the image needs no system library.
asyncpg is faster per query, but an index query costs a loopback or LAN round trip
either way, and statements are prepared after a few uses in both.

Concurrency (many writers in many processes, ``READ COMMITTED``):

- **Per repository.** A transaction that changes tags or manifests first locks its
  repository's row (``SELECT ... FOR NO KEY UPDATE``). Writers of one repository run
  one after the other and each statement after the lock sees everything the previous
  one committed, so the checks SQLite's writer made (immutable tags, last writer wins,
  an index's children, retention's "still untagged") hold; different repositories never
  wait for each other. The hybrid logical clock lives in that row too (only versions of
  one repository's tags are ever compared), so versions strictly grow in commit order
  per repository with no global hot row.
- **Blobs and GC.** Publishing a blob file and linking it, and forgetting a blob and
  removing its file, run under a session advisory lock on the digest (plus a shared
  lock on "all blobs", which ``locked`` takes exclusively), on connections of their own
  and with the storage operation outside any transaction (``_guarded_write``). A manifest push locks
  the rows of the blobs it needs ``FOR SHARE``; collection locks the blob's row ``FOR
  UPDATE`` and only then, in a later statement, checks that no manifest references it:
  either the push waits and finds the blob gone (``MANIFEST_BLOB_UNKNOWN``), or the
  collector waits and sees the push's reference.
- **The change log's order.** Entries get their ``seq`` only after they are committed
  (``changelog.number``, run by the consumers before they read): a sequence given at
  insert would let a transaction that took 7 commit after one that took 8 was already
  delivered, and 7 would never be read. Numbering is serialised by a lock on one row and
  numbers only entries visible to it, so ``seq`` grows in visibility order and a
  consumer paging past its cursor misses nothing. Writers never wait for it.
- Deadlocks and serialization failures (rare with the above) are retried for plain
  transactions; one with storage actions is not (its file action already ran) and fails
  like a crash would, which GC's orphan sweep and trash recovery already handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from registry_server.storage import changelog, postgres_schema
from registry_server.storage.driver import BackendUnavailable
from registry_server.storage.sql_index import SqlIndex
from registry_server.storage.sqltx import Dialect, Query, Result, Tx

log = logging.getLogger("registry_server.storage")

T = TypeVar("T")

DIALECT = Dialect(
    name="postgresql",
    unlimited=None,  # LIMIT NULL; a negative LIMIT is an error
    lock_repository="SELECT 1 FROM repositories WHERE id = ? FOR NO KEY UPDATE",
    share_blob_rows=" FOR SHARE OF b",
    lock_blob_row=" FOR UPDATE",
    per_repository_clock=True,
    now="extract(epoch FROM clock_timestamp())",
)

# Advisory lock keys (64-bit): migrations, "all blobs", and one per blob digest.
_MIGRATIONS_KEY = 0x6265727468_01  # "berth" 01
_ALL_BLOBS_KEY = 0x6265727468_02
_RETRIES = 5


def _blob_key(digest: str) -> int:
    return int.from_bytes(
        hashlib.sha256(b"berth-blob:" + digest.encode()).digest()[:8], "big", signed=True
    )


@functools.lru_cache(maxsize=2048)
def _sql(text: str) -> str:
    """The shared ``?`` placeholders as psycopg's ``%s`` (no literal ``%`` is left bare).
    The text is ours (``sqltx.Query``), never a client's: values go as parameters."""
    return text.replace("%", "%%").replace("?", "%s")


async def _run(conn: psycopg.AsyncConnection[Any], tx: Tx[T]) -> T:
    async with conn.cursor() as cursor:
        try:
            query = next(tx)
            while True:
                await cursor.execute(_sql(query.sql), query.params)
                rows = await cursor.fetchall() if cursor.description is not None else []
                query = tx.send(Result(rows, cursor.rowcount))
        except StopIteration as done:
            value: T = done.value
            return value


def _run_blocking(conn: psycopg.Connection[Any], tx: Tx[T]) -> T:
    """The same for start-up, before the event loop runs."""
    with conn.cursor() as cursor:
        try:
            query = next(tx)
            while True:
                cursor.execute(_sql(query.sql), query.params)
                rows = cursor.fetchall() if cursor.description is not None else []
                query = tx.send(Result(rows, cursor.rowcount))
        except StopIteration as done:
            value: T = done.value
            return value


# How long a migration waits for a table lock before it lets go and tries again (for
# about two minutes in all): an ALTER TABLE queued behind an older replica's long
# transaction holds up every query of every replica on that table while it waits.
MIGRATION_LOCK_TIMEOUT = 1.0
_MIGRATION_ATTEMPTS = 60


def migrate(
    conn: psycopg.Connection[Any],
    lock_timeout: float = MIGRATION_LOCK_TIMEOUT,
    attempts: int = _MIGRATION_ATTEMPTS,
) -> None:
    """Bring the schema to ``postgres_schema.LATEST``; safe when replicas start together
    (one advisory lock: the others wait, then find nothing to do)."""
    for attempt in range(1, attempts + 1):
        try:
            _migrate_once(conn, lock_timeout)
            return
        except pg_errors.LockNotAvailable:
            if attempt == attempts:
                raise
            log.warning("schema migration waited %gs for a table lock; trying again", lock_timeout)
            # Others' queries go on meanwhile (they queued only behind the one waiting).
            time.sleep(random.uniform(1.0, 3.0))


def _migrate_once(conn: psycopg.Connection[Any], lock_timeout: float) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATIONS_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_version").fetchall()}
        if done and max(done) > postgres_schema.LATEST:
            raise RuntimeError(
                f"the metadata database has schema version {max(done)}, newer than this"
                f" server's {postgres_schema.LATEST}: run a newer server"
            )
        # Only for the scripts: the advisory lock above is waited for as long as it takes.
        conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        for version, script in postgres_schema.MIGRATIONS:
            if version not in done:
                conn.execute(script)  # no parameters: several statements at once
                conn.execute(
                    "INSERT INTO schema_version(version, applied) VALUES (%s, %s)",
                    (version, time.time()),
                )


def _identity() -> Tx[str]:
    yield Query(
        "INSERT INTO meta(key, value) VALUES ('instance', ?) ON CONFLICT DO NOTHING",
        (uuid.uuid4().hex,),
    )
    row = (yield Query("SELECT value FROM meta WHERE key = 'instance'")).first()
    assert row is not None
    return str(row[0])


def _ping() -> Tx[None]:
    yield Query("SELECT 1 FROM repositories LIMIT 1")


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """The database cannot be reached (connection refused or lost, no pooled connection
    in time): BackendUnavailable, which the API answers with 503. Conflicts between
    transactions (TransactionRollback, also "operational") are not that."""
    try:
        yield
    except pg_errors.TransactionRollback:
        raise
    except psycopg.OperationalError as exc:
        raise BackendUnavailable("metadata database", str(exc)) from exc


def guard_pool_size(pool_size: int) -> int:
    """Connections for writes under a blob's lock, beside ``pool_size`` for the rest
    (mostly idle: they wait on a storage operation)."""
    return pool_size


async def _lock_blobs(conn: psycopg.AsyncConnection[Any], blob: str | None) -> None:
    """For the session: the lock of one blob (and a share of "all blobs"), or with no
    blob named, the lock of all blobs."""
    if blob is None:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_ALL_BLOBS_KEY,))
        return
    await conn.execute("SELECT pg_advisory_lock_shared(%s)", (_ALL_BLOBS_KEY,))
    await conn.execute("SELECT pg_advisory_lock(%s)", (_blob_key(blob),))


async def _unlock_blobs(conn: psycopg.AsyncConnection[Any], blob: str | None) -> None:
    if blob is None:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_ALL_BLOBS_KEY,))
        return
    await conn.execute("SELECT pg_advisory_unlock(%s)", (_blob_key(blob),))
    await conn.execute("SELECT pg_advisory_unlock_shared(%s)", (_ALL_BLOBS_KEY,))


def pool_dsn(dsn: str) -> str:
    """``dsn`` with what the DSN does not set itself: a connect timeout (libpq waits for
    an unreachable server forever otherwise), and keepalives and a user timeout, so that
    a query on a connection whose server is cut off without a reset (a node lost, a
    partition) fails within about 30 s rather than the kernel's 15 minutes of
    retransmissions, and the replica answers 503 and recovers."""
    given = conninfo_to_dict(dsn)
    wanted = {
        "connect_timeout": 30,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    extra = {key: value for key, value in wanted.items() if key not in given}
    return make_conninfo(dsn, **extra) if extra else dsn


class PostgresIndex(SqlIndex):
    dialect = DIALECT

    def __init__(
        self, dsn: str, region: str = "", peers: Sequence[str] = (), pool_size: int = 10
    ) -> None:
        """Migrate and register the log's consumers (blocking: call before the event loop
        runs, or through ``connect``); ``open`` then starts the connection pool."""
        super().__init__(region, peers)
        self._pool_size = pool_size
        dsn = pool_dsn(dsn)
        self._dsn = dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            with conn.transaction():
                self.instance_id = _run_blocking(conn, _identity())
                _run_blocking(conn, changelog.register(self.peers))
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # Writes that hold a blob's lock across a storage operation (a publish that
        # copies a layer of gigabytes on S3): connections of their own, so that they
        # never take every connection from the requests, nor /readyz's ping.
        self._guards: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # A publish queues here for a guard connection, however long the storage
        # operations before it take; the pool's own wait is for the database.
        self._guard_turns = asyncio.Semaphore(guard_pool_size(pool_size))

    @staticmethod
    async def _unlocked_back(conn: psycopg.AsyncConnection[Any]) -> None:
        # Whatever path gave it back, it holds no blob lock for the next user.
        await conn.execute("SELECT pg_advisory_unlock_all()")

    @classmethod
    async def connect(
        cls, dsn: str, region: str = "", peers: Sequence[str] = (), pool_size: int = 10
    ) -> PostgresIndex:
        """Migrate in a thread, then open the pool: for callers inside the event loop."""
        index = await asyncio.to_thread(cls, dsn, region, peers, pool_size)
        await index.open()
        return index

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self._dsn,
            min_size=min(2, self._pool_size),
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="berth-index",
        )
        await pool.open(wait=True, timeout=30)
        guards: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self._dsn,
            min_size=0,
            max_size=guard_pool_size(self._pool_size),
            kwargs={"autocommit": True},
            open=False,
            name="berth-index-guards",
            # Few and seldom used, so often stale after an outage or a failover: each
            # checked when taken (a round trip per publish, against a blob's upload).
            check=AsyncConnectionPool.check_connection,
            reset=self._unlocked_back,
        )
        await guards.open(wait=False)
        self._pool, self._guards = pool, guards

    async def close(self) -> None:
        for pool in (self._pool, self._guards):
            if pool is not None:
                await pool.close()
        self._pool = self._guards = None

    def _connections(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("PostgresIndex used before open()")
        return self._pool

    async def ping(self) -> None:
        await self._read(_ping())

    async def _read(self, tx: Tx[T]) -> T:
        with _unavailable():
            async with self._connections().connection() as conn:
                return await _run(conn, tx)

    async def _write(
        self,
        tx: Callable[[], Tx[T]],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
        blob: str | None = None,
        frees: bool = False,  # the database's own volume is PostgreSQL's to manage
    ) -> T:
        with _unavailable():
            return await self._write_once(tx, before, after, blob)

    async def _write_once(
        self,
        tx: Callable[[], Tx[T]],
        before: Callable[[], Awaitable[None]] | None,
        after: Callable[[T], Awaitable[None]] | None,
        blob: str | None,
    ) -> T:
        if before is not None or after is not None:
            return await self._guarded_write(tx, before, after, blob)
        attempt = 0
        while True:
            try:
                async with self._connections().connection() as conn, conn.transaction():
                    return await _run(conn, tx())
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                attempt += 1
                if attempt > _RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * attempt))

    async def _guarded_write(
        self,
        tx: Callable[[], Tx[T]],
        before: Callable[[], Awaitable[None]] | None,
        after: Callable[[T], Awaitable[None]] | None,
        blob: str | None,
    ) -> T:
        """``before`` (a storage operation), the write and ``after`` under the blob's
        lock (or all blobs'), taken for the session rather than a transaction: the
        storage operation runs outside any transaction, so a server's
        idle_in_transaction_session_timeout cannot end a long copy. On any failure the
        connection is closed, which releases the locks (never back to the pool with
        them)."""
        if self._guards is None:
            raise RuntimeError("PostgresIndex used before open()")
        async with self._guard_turns, self._guards.connection() as conn:
            try:
                await _lock_blobs(conn, blob)
                if before is not None:
                    await before()
                async with conn.transaction():
                    result = await _run(conn, tx())
                    if after is not None:
                        await after(result)
                await _unlock_blobs(conn, blob)
            except BaseException:
                await conn.close()
                raise
            return result

    async def _number(self) -> None:
        await self._write(changelog.number)
