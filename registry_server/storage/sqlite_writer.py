"""SQLite's one writer: a thread with its own connection, and group commit.

Writes queued while the writer is busy share one transaction (each in its own savepoint,
so a failing write undoes only itself): one commit, one fsync, for the whole group.
Guarded writes run storage operations while their transaction holds the database write
lock (``BEGIN IMMEDIATE``), so that publishing a blob file and linking it (or forgetting a
blob and deleting its file) are atomic with respect to every other process. Those with
only a ``before`` step and a key (a blob's publish and link) join the group too: their
steps run together under the group's transaction, one at a time per key; the others
(``after`` steps: the collector's) each take the lock alone.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from registry_server.storage.blocking import BlockingPool

T = TypeVar("T")

# Writes queued while the writer is busy commit together, at most this many at once.
GROUP_COMMIT_MAX = 256


@dataclass
class _Queued:
    fn: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]
    before: Callable[[], Awaitable[None]] | None = None
    key: str | None = None


class SqliteWriter:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # One thread, always the same: the connection is used from it only.
        self._thread = BlockingPool("sqlite-writer", 1)
        # One transaction at a time on the writer connection, including guarded ones that
        # span several thread hops.
        self._lock = asyncio.Lock()
        self._queue: list[_Queued] = []  # writes waiting for the writer (group commit)
        self._flusher: asyncio.Task[None] | None = None

    def close(self) -> None:
        self._thread.shutdown()  # what it runs finishes before the connection closes
        self.conn.close()

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
        key: str | None = None,
    ) -> T:
        """Run ``fn`` in a write transaction on the writer thread; returns when committed.
        ``before`` runs first, and ``after`` with fn's result, both under the transaction's
        lock; a ``before`` with a ``key`` (and no ``after``) may share the transaction with
        other writes, never running at the same time as another step of the same key."""
        loop = asyncio.get_running_loop()
        if after is None and (before is None or key is not None):
            done: asyncio.Future[T] = loop.create_future()
            self._queue.append(_Queued(fn, done, before, key))
            if self._flusher is None:
                self._flusher = loop.create_task(self._flush())
            return await done

        call, conn = self._thread.call, self.conn
        async with self._lock:
            await call(conn.execute, "BEGIN IMMEDIATE")
            try:
                if before is not None:
                    await before()
                result = await call(fn, conn)
                if after is not None:
                    await after(result)
            except BaseException:
                await asyncio.shield(call(self._rollback))
                raise
            await call(conn.execute, "COMMIT")
            return result

    async def _flush(self) -> None:
        """Commit the queued writes, batch after batch, until none are left."""
        batch: list[_Queued] = []
        try:
            while self._queue:
                batch = self._queue[:GROUP_COMMIT_MAX]
                del self._queue[: len(batch)]
                batch = [item for item in batch if not item.done.cancelled()]
                if not batch:
                    continue
                async with self._lock:
                    try:
                        outcomes = await self._commit_batch(batch)
                    except Exception as exc:  # BEGIN or COMMIT failed: none of it is stored
                        outcomes = [(False, exc)] * len(batch)
                for item, (ok, value) in zip(batch, outcomes, strict=True):
                    if item.done.done():
                        continue
                    if ok:
                        item.done.set_result(value)
                    else:
                        item.done.set_exception(value)
                batch = []
        except BaseException as exc:  # cancelled (shutdown): nobody may wait forever
            for item in [*batch, *self._queue]:
                if not item.done.done():
                    item.done.set_exception(exc)
            self._queue.clear()
            raise
        finally:
            self._flusher = None

    async def _commit_batch(self, batch: list[_Queued]) -> list[tuple[bool, Any]]:
        call = self._thread.call
        fns = [item.fn for item in batch]
        if all(item.before is None for item in batch):
            return await call(self._run_batch, fns, True)
        await call(self.conn.execute, "BEGIN IMMEDIATE")
        try:
            failed = await _run_befores(batch)
            ready = [fn for fn, failure in zip(fns, failed, strict=True) if failure is None]
            ran = iter(await call(self._run_batch, ready, False))
        except BaseException:
            await asyncio.shield(call(self._rollback))
            raise
        return [(False, failure) if failure is not None else next(ran) for failure in failed]

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _run_batch(
        self, fns: list[Callable[[sqlite3.Connection], Any]], begin: bool
    ) -> list[tuple[bool, Any]]:
        """Each write in a savepoint, so a failing one undoes only itself, then COMMIT
        (the transaction is begun here with ``begin``, else it is already open)."""
        conn = self.conn
        outcomes: list[tuple[bool, Any]] = []
        if begin:
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
            self._rollback()
            raise
        return outcomes


async def _run_befores(batch: list[_Queued]) -> list[BaseException | None]:
    """Every ``before`` of the batch, those of one key in turn, the keys side by side;
    what each raised (None when it went through)."""
    failed: list[BaseException | None] = [None] * len(batch)
    by_key: dict[str | None, list[int]] = {}
    for i, item in enumerate(batch):
        if item.before is not None:
            by_key.setdefault(item.key, []).append(i)

    async def in_turn(indexes: list[int]) -> None:
        for i in indexes:
            before = batch[i].before
            assert before is not None
            try:
                await before()
            except Exception as exc:
                failed[i] = exc

    await asyncio.gather(*(in_turn(indexes) for indexes in by_key.values()))
    return failed
