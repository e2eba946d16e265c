"""SQLite's one writer: a thread with its own connection, and group commit.

Plain writes queued while the writer is busy share one transaction (each in its own
savepoint, so a failing write undoes only itself): one commit, one fsync, for the whole
group. Guarded writes (``before``/``after``) run storage operations while their
transaction holds the database write lock (``BEGIN IMMEDIATE``), so that publishing a
blob file and linking it (or forgetting a blob and deleting its file) are atomic with
respect to every other process.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Plain writes queued while the writer is busy commit together, at most this many at once.
GROUP_COMMIT_MAX = 256


class SqliteWriter:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        # One transaction at a time on the writer connection, including guarded ones that
        # span several thread hops.
        self._lock = asyncio.Lock()
        # Plain writes waiting for the writer (group commit).
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.conn.close()

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``fn`` in a write transaction on the writer thread; returns when committed."""
        loop = asyncio.get_running_loop()
        conn = self.conn
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
                batch = self._queue[:GROUP_COMMIT_MAX]
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
        conn = self.conn
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
