"""The background loops' shared lifecycle: cancelling them, and running them only while
this process is elected for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Gauge

from registry_server.storage.election import Election

log = logging.getLogger("registry_server.election")

ELECTED = Gauge("berth_elected", "1 while this process holds (runs) the task", ["task"])

Work = Callable[[], Coroutine[Any, Any, None]]


async def run_elected(
    election: Election, task: str, work: Work, restart_seconds: float = 5.0
) -> None:
    """Run ``work()`` only while this process holds ``task``: wait to be elected, run it,
    cancel it the moment the term is lost, and compete again. Work that ends or fails
    while the task is still held is started again after ``restart_seconds``."""
    ELECTED.labels(task).set(0)
    while True:
        term = await election.acquire(task)
        ELECTED.labels(task).set(1)
        log.info("running elected task", extra={"task": task, "replica": election.replica_id})
        try:
            while not term.lost.is_set():
                await _run_term(term.lost, task, work)
                if not term.lost.is_set():  # the work ended on its own: again, in a while
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(term.lost.wait(), restart_seconds)
        finally:
            ELECTED.labels(task).set(0)
            election.release(term)
        log.warning("elected task stopped: term lost", extra={"task": task})


async def _run_term(lost: asyncio.Event, task: str, work: Work) -> None:
    """``work()`` until it ends or ``lost`` is set (then cancelled, and waited for)."""
    job = asyncio.create_task(work())
    waiter = asyncio.create_task(lost.wait())
    try:
        await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (waiter, job):  # job: still running when lost, or when cancelled
            pending.cancel()
        await asyncio.gather(waiter, job, return_exceptions=True)
    if not job.cancelled() and (failure := job.exception()) is not None:
        log.error("elected task failed; restarting it", extra={"task": task}, exc_info=failure)
