"""Threads for blocking storage calls, with a cheaper hand-off than ``asyncio.to_thread``.

A push makes a dozen file system calls (open, write, fsync, rename, ...), each in a
thread so that a slow disk never stalls the event loop. ``asyncio.to_thread`` spends
about 90 µs of CPU per call on this project's 2-core test machine (a context copy, a
``concurrent.futures.Future`` chained to an asyncio one, the executor's condition
variable); a plain queue and one ``call_soon_threadsafe`` spend half that. On a push of
many small blobs, which is bound by the server's CPU, the difference is a tenth of it.

Threads start on demand, up to ``max_threads``, and stay; a forked worker process starts
its own. As with ``to_thread``, a call whose caller was cancelled before it started is
skipped, and one already running finishes with its result dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

_Item = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
    Callable[[Any], object] | None,  # what takes a result its caller left behind
]


def _settle(
    future: asyncio.Future[Any], ok: bool, value: Any, dropped: Callable[[Any], object] | None
) -> None:
    if future.done():  # the caller was cancelled meanwhile
        if ok and dropped is not None:
            dropped(value)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


_POOLS: weakref.WeakSet[BlockingPool] = weakref.WeakSet()


def _after_fork() -> None:
    for pool in list(_POOLS):  # the child has none of the parent's threads
        pool._reset()


os.register_at_fork(after_in_child=_after_fork)


class BlockingPool:
    def __init__(self, name: str, max_threads: int) -> None:
        self.name = name
        self.max_threads = max_threads
        self._reset()
        _POOLS.add(self)

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0

    def shutdown(self) -> None:
        """Let the threads finish what they were given, then end; waits for them."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in one of the pool's threads."""
        return await self.submit(fn, *args, **kwargs)

    async def call_owned(
        self, dropped: Callable[[T], object], fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``call`` for a result that must not be lost (an open descriptor): one made
        after the caller was cancelled is handed to ``dropped`` (which closes it)."""
        return await self._submit(dropped, fn, args, kwargs)

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """``call`` without waiting: the future of its result (from a running loop)."""
        return self._submit(None, fn, args, kwargs)

    def _submit(
        self,
        dropped: Callable[[T], object] | None,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args, kwargs, dropped))
        thread = None
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.max_threads:
                name = f"{self.name}-{len(self._threads) + 1}"
                thread = threading.Thread(target=self._work, name=name, daemon=True)
                self._threads.append(thread)
                self._idle += 1  # counted idle until it takes its first item
        if thread is not None:
            thread.start()
        return future

    def _work(self) -> None:
        items = self._queue
        lock = self._lock
        while True:
            item = items.get()
            with lock:
                self._idle -= 1
            if item is None:
                return
            loop, future, fn, args, kwargs, dropped = item
            if future.cancelled():  # its caller gave up before it started: as to_thread
                with lock:
                    self._idle += 1
                continue
            try:
                outcome: tuple[bool, Any] = (True, fn(*args, **kwargs))
            except BaseException as exc:  # delivered to the caller, as to_thread does
                outcome = (False, exc)
            with lock:
                self._idle += 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, *outcome, dropped)
            del item, future, fn, args, kwargs, outcome, dropped


# File system calls of the storage driver and the metadata index's file work. Many
# threads: a call blocked on a slow disk (an fsync) must not hold back a quick stat.
files = BlockingPool("storage-io", 32)
