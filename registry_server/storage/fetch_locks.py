"""Which process fetches an uncached blob from an upstream, when several could.

The pull-through cache makes one fetch per digest within a process (its flights). Worker
processes of one pod, and replicas over one database, are other processes: without a
shared claim each would fetch the same blob at once. A claim is an optimisation, never
a guard of correctness: a fetch verifies and stores what it got whoever else fetches, so
a claim lost (a dropped database session) costs at most a second download.

- ``NoFetchLocks``: one process (nothing to share).
- ``FileFetchLocks``: workers on one storage volume, ``flock`` on files under a folder.
  A process that dies lets go of its locks with its file descriptors.
- ``PostgresFetchLocks``: replicas over one PostgreSQL, session advisory locks on a
  connection of their own (not the index's pool, whose connections go back and forth).
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
# Lock files: one per bucket of digests. Two digests in one bucket only take turns.
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
        self._held: dict[str, int] = {}  # name -> the locked file's descriptor

    def _try_sync(self, name: str) -> int | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{_key(name) % _BUCKETS:03x}.lock"
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
        if name in self._held:  # a caller's own claim is never taken twice
            return False
        fd = await blocking.files.call(self._try_sync, name)
        if fd is None:
            return False
        if name in self._held:  # taken by another caller here meanwhile
            os.close(fd)
            return False
        self._held[name] = fd
        return True

    async def release(self, name: str) -> None:
        fd = self._held.pop(name, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor lets go of its lock

    async def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()


class PostgresFetchLocks:
    def __init__(self, dsn: str, timeout_seconds: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._held: set[str] = set()

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            import psycopg

            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=max(2, int(self._timeout))
            )
            self._held.clear()  # a new session holds nothing
        return self._conn

    async def try_hold(self, name: str) -> bool:
        if name in self._held:
            return False
        try:
            async with self._lock, asyncio.timeout(self._timeout):
                conn = await self._connection()
                cur = await conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, _key(name))
                )
                row = await cur.fetchone()
        except Exception as exc:  # no claim to be had: fetch anyway
            log.warning("fetch lock unavailable, fetching anyway", extra={"error": repr(exc)})
            await self._drop()
            return True
        if not (row and row[0]):
            return False
        self._held.add(name)
        return True

    async def release(self, name: str) -> None:
        if name not in self._held:
            return
        self._held.discard(name)
        try:
            async with self._lock, asyncio.timeout(self._timeout):
                await self._conn.execute(
                    "SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, _key(name))
                )
        except Exception:  # a session that cannot unlock is ended
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        await self._drop()
