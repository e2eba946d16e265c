"""Which process fetches an uncached blob or manifest from an upstream, when several could.

The pull-through cache makes one fetch per digest within a process (its flights). Worker
processes of one pod, and replicas over one database, are other processes: without a
shared claim each would fetch the same blob at once. A claim is an optimisation, never
a guard of correctness: a fetch verifies and stores what it got whoever else fetches, so
a claim lost (a dropped database session) costs at most a second download.

- ``NoFetchLocks``: one process (nothing to share).
- ``FileFetchLocks``: workers on one storage volume, ``flock`` on files under a folder.
  A process that dies lets go of its locks with its file descriptors.
- ``PostgresFetchLocks``: replicas over one PostgreSQL, session advisory locks on a
  connection of their own (not the index's pool, whose connections go back and forth),
  with the election's keepalives: a holder whose node is lost lets go within ~20 s.

Every ``try_hold`` may be cancelled (a client gone, a timeout) without leaving a claim
behind that nobody would release.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from registry_server.storage import blocking

log = logging.getLogger("registry_server.fetch_locks")

# The first of the two int4 advisory lock keys: apart from the election's ("brth") and
# from the index's single-bigint keys.
NAMESPACE = int.from_bytes(b"bfch", "big")
# Lock files: one per bucket of names. Names of one bucket held by different processes
# take turns; within a process they share the bucket's lock.
_BUCKETS = 4096


class FetchLocks(Protocol):
    async def try_hold(self, name: str) -> bool:
        """Claim ``name`` if no other process (nor caller here) holds it."""

    async def release(self, name: str) -> None: ...

    async def close(self) -> None: ...


def _key(name: str) -> int:
    digest = hashlib.sha256(b"berth-fetch:" + name.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class NoFetchLocks:
    async def try_hold(self, name: str) -> bool:
        return True

    async def release(self, name: str) -> None:
        pass

    async def close(self) -> None:
        pass


class FileFetchLocks:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # bucket -> (the locked file's descriptor, the names held in it here)
        self._buckets: dict[int, tuple[int, set[str]]] = {}

    def _lock_sync(self, bucket: int) -> int | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{bucket:03x}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def try_hold(self, name: str) -> bool:
        bucket = _key(name) % _BUCKETS
        held = self._buckets.get(bucket)
        if held is None:
            locking = blocking.files.submit(self._lock_sync, bucket)
            try:
                fd = await asyncio.shield(locking)
            except asyncio.CancelledError:
                # The thread may still lock the file: its descriptor is closed then.
                locking.add_done_callback(_close_locked)
                raise
            if fd is None:
                return False
            held = self._buckets.get(bucket)
            if held is None:
                held = self._buckets[bucket] = (fd, set())
            else:  # locked by another caller here meanwhile: one descriptor is enough
                os.close(fd)
        if name in held[1]:  # a caller's own claim is never taken twice
            return False
        held[1].add(name)
        return True

    async def release(self, name: str) -> None:
        bucket = _key(name) % _BUCKETS
        held = self._buckets.get(bucket)
        if held is None or name not in held[1]:
            return
        held[1].discard(name)
        if not held[1]:
            del self._buckets[bucket]
            os.close(held[0])  # closing the descriptor lets go of its lock

    async def close(self) -> None:
        for fd, _ in self._buckets.values():
            os.close(fd)
        self._buckets.clear()


def _close_locked(locking: asyncio.Future[int | None]) -> None:
    if not locking.cancelled() and locking.exception() is None:
        fd = locking.result()
        if fd is not None:
            os.close(fd)


class PostgresFetchLocks:
    def __init__(self, dsn: str, replica_id: str = "", timeout_seconds: float = 5.0) -> None:
        from registry_server.storage.postgres_election import session_dsn

        self._dsn = session_dsn(dsn, f"berth-fetch:{replica_id}", timeout_seconds)
        self._timeout = timeout_seconds
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._held: dict[str, Any] = {}  # name -> the connection whose session holds it

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            from registry_server.storage.postgres_election import connect_session

            self._held.clear()  # a new session holds nothing
            self._conn = await connect_session(self._dsn)
        return self._conn

    async def try_hold(self, name: str) -> bool:
        if name in self._held:
            return False
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await self._connection()
                    cur = await conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, _key(name))
                    )
                    row = await cur.fetchone()
            except Exception as exc:  # no claim to be had: fetch anyway
                log.warning("fetch claims unavailable, fetching anyway", extra={"error": repr(exc)})
                await self._drop()
                return True
            except BaseException:  # cancelled: the lock may be held; the session goes
                await self._drop()
                raise
        if not (row and row[0]):
            return False
        self._held[name] = conn
        return True

    async def release(self, name: str) -> None:
        conn = self._held.pop(name, None)
        if conn is None:
            return
        async with self._lock:
            if conn is not self._conn:  # its session has ended, and the lock with it
                return
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, _key(name)))
            except Exception:  # a session that may still hold it is ended
                await self._drop()
            except BaseException:
                await self._drop()
                raise

    async def _drop(self) -> None:
        """End the session (and so every claim this process holds)."""
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        await self._drop()
