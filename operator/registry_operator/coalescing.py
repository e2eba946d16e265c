"""Run one job per key at a time and fold bursts of triggers into one run (asyncio only).

A Registry is reconciled from several triggers (its own changes, each child's watch
events, a resync timer). Jobs for one key never overlap, and a caller that arrives while
a job for its key is still waiting to start shares that job's result: the job has not
read anything yet, so it will see whatever the caller was told about.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Coalescer(Generic[K, T]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[T]] = {}
        self._queued: dict[K, asyncio.Task[T]] = {}

    def busy(self, key: K) -> bool:
        return key in self._running or key in self._queued

    async def run(self, key: K, job: Callable[[], Awaitable[T]]) -> T:
        task = self._queued.get(key)
        if task is None:
            previous = self._running.get(key)
            task = asyncio.create_task(self._chain(key, previous, job))
            task.add_done_callback(_consume)
            self._queued[key] = task
        # A caller cancelled (e.g. by a handler timeout) must not cancel the shared job.
        return await asyncio.shield(task)

    async def _chain(
        self, key: K, previous: asyncio.Task[T] | None, job: Callable[[], Awaitable[T]]
    ) -> T:
        if previous is not None:
            await asyncio.wait([previous])
        me = cast("asyncio.Task[T]", asyncio.current_task())
        if self._queued.get(key) is me:
            del self._queued[key]
        self._running[key] = me
        try:
            return await job()
        finally:
            if self._running.get(key) is me:
                del self._running[key]


def _consume(task: asyncio.Task[object]) -> None:
    """Mark the outcome as seen: every caller may have gone away (cancelled) by now."""
    with contextlib.suppress(asyncio.CancelledError):
        task.exception()
