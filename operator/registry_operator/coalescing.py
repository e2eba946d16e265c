"""Run one job per key at a time and fold bursts of triggers into one run (asyncio only).

A Registry is reconciled from several triggers (its own changes, each child's watch
events, the resync poll). Jobs for one key never overlap, and a caller that arrives while
a job for its key is still waiting to start shares that job's result: the job has not
read anything yet, so it will see whatever the caller was told about.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Coalescer(Generic[K, T]):
    def __init__(self, pause: Callable[[K], float] | None = None) -> None:
        self._running: dict[K, asyncio.Task[T]] = {}
        self._queued: dict[K, asyncio.Task[T]] = {}
        # Seconds a queued run waits before it starts (still sharing with later callers):
        # the operator spaces expensive runs of one key so that a burst of triggers does
        # not keep the CPU busy with back-to-back runs.
        self.pause = pause

    def busy(self, key: K) -> bool:
        return key in self._running or key in self._queued

    async def run(self, key: K, job: Callable[[], Awaitable[T]]) -> T:
        # A caller cancelled (e.g. by a handler timeout) must not cancel the shared job.
        return await asyncio.shield(self._queue(key, job))

    def request(
        self,
        key: K,
        job: Callable[[], Awaitable[T]],
        failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Ask for a run without waiting for it. While one is queued, asking again costs
        nothing: no task, no waiter (ten thousand Repositories created in a burst made
        ten thousand waiting tasks, each holding the context, with the event's body, of
        the handler that made it).
        `failed` is told the run's exception, if any (once, however many asked)."""
        if key in self._queued:
            return
        task = self._queue(key, job)
        if failed is not None:
            task.add_done_callback(lambda done: _tell(done, failed))

    def _queue(self, key: K, job: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        task = self._queued.get(key)
        if task is None:
            previous = self._running.get(key)
            # In a context of its own, empty: the caller's (in a Kopf handler: with the
            # event's cause and body) would stay alive as long as the run waits, and
            # runs queued behind busy threads after a restart held a thousand
            # Deployments so (issue 18).
            task = asyncio.create_task(
                self._chain(key, previous, job), context=contextvars.Context()
            )
            task.add_done_callback(_consume)
            self._queued[key] = task
        return task

    async def _chain(
        self, key: K, previous: asyncio.Task[T] | None, job: Callable[[], Awaitable[T]]
    ) -> T:
        if previous is not None:
            await asyncio.wait([previous])
            previous = None  # nor its result, all through this run
        wait = self.pause(key) if self.pause is not None else 0.0
        if wait > 0:
            await asyncio.sleep(wait)
        me = cast("asyncio.Task[T]", asyncio.current_task())
        if self._queued.get(key) is me:
            del self._queued[key]
        self._running[key] = me
        try:
            return await job()
        finally:
            if self._running.get(key) is me:
                del self._running[key]


def _tell(task: asyncio.Task[Any], failed: Callable[[BaseException], None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        failed(cast(BaseException, task.exception()))


def _consume(task: asyncio.Task[object]) -> None:
    """Mark the outcome as seen: every caller may have gone away (cancelled) by now."""
    with contextlib.suppress(asyncio.CancelledError):
        task.exception()
