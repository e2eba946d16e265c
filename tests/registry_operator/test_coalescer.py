"""One job per key at a time; callers arriving while a job waits share it."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from registry_operator import coalescing


async def test_jobs_for_one_key_never_overlap_and_bursts_fold() -> None:
    queue: coalescing.Coalescer[str, int] = coalescing.Coalescer()
    running = 0
    runs = 0
    gate = asyncio.Event()

    async def job() -> int:
        nonlocal running, runs
        running += 1
        runs += 1
        assert running == 1
        await gate.wait()
        running -= 1
        return runs

    first = asyncio.create_task(queue.run("a", job))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(queue.run("a", job)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(first, *waiting)
    assert results == [1, 2, 2, 2, 2, 2]
    assert runs == 2
    assert not queue.busy("a")


async def test_keys_are_independent() -> None:
    queue: coalescing.Coalescer[str, str] = coalescing.Coalescer()
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "slow"

    async def fast() -> str:
        return "fast"

    blocked = asyncio.create_task(queue.run("a", slow))
    assert await asyncio.wait_for(queue.run("b", fast), 1) == "fast"
    gate.set()
    assert await blocked == "slow"


async def test_errors_reach_every_sharing_caller_and_do_not_block_the_key() -> None:
    queue: coalescing.Coalescer[str, str] = coalescing.Coalescer()
    gate = asyncio.Event()

    async def hold() -> str:
        await gate.wait()
        return "held"

    async def fail() -> str:
        raise ValueError("boom")

    holder = asyncio.create_task(queue.run("a", hold))
    await asyncio.sleep(0)
    sharers = [asyncio.create_task(queue.run("a", fail)) for _ in range(2)]
    await asyncio.sleep(0)
    gate.set()
    assert await holder == "held"
    for sharer in sharers:
        with pytest.raises(ValueError, match="boom"):
            await sharer

    async def ok() -> str:
        return "ok"

    assert await queue.run("a", ok) == "ok"


async def test_a_cancelled_caller_does_not_cancel_the_shared_job() -> None:
    queue: coalescing.Coalescer[str, str] = coalescing.Coalescer()
    gate = asyncio.Event()

    async def job() -> str:
        await gate.wait()
        return "done"

    impatient = asyncio.create_task(queue.run("a", job))
    await asyncio.sleep(0)
    patient = asyncio.create_task(queue.run("a", job))
    await asyncio.sleep(0)
    impatient.cancel()
    gate.set()
    assert await patient == "done"
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_requests_share_the_queued_run_without_a_task_each() -> None:
    """Fire and forget: thousands of requests while one run is queued add nothing, and
    the run does not keep the context of whoever asked (in a Kopf event handler: the
    event's cause and body) alive: it runs in an empty one."""
    queue: coalescing.Coalescer[str, int] = coalescing.Coalescer()
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")
    runs: list[str] = []
    gate = asyncio.Event()

    async def job() -> int:
        await gate.wait()
        runs.append(marker.get())
        return len(runs)

    marker.set("caller")
    before = len(asyncio.all_tasks())
    queue.request("a", job)  # starts: runs once the gate opens
    await asyncio.sleep(0)
    for _ in range(1000):
        queue.request("a", job)  # the second run, queued: shared by all of these
    assert len(asyncio.all_tasks()) - before == 2
    gate.set()
    await _idle(queue)
    assert runs == ["none", "none"]


async def test_a_failed_request_is_told_once() -> None:
    queue: coalescing.Coalescer[str, int] = coalescing.Coalescer()
    told: list[str] = []

    async def job() -> int:
        raise RuntimeError("boom")

    for _ in range(3):
        queue.request("a", job, lambda exc: told.append(str(exc)))
    await _idle(queue)
    assert told == ["boom"]


async def _idle(queue: coalescing.Coalescer[str, int]) -> None:
    for _ in range(500):
        if not queue.busy("a"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("still busy")


async def test_a_pause_before_a_run_is_shared_by_the_requests_meanwhile() -> None:
    paused: list[str] = []

    def pause(key: str) -> float:
        paused.append(key)
        return 0.05

    queue: coalescing.Coalescer[str, int] = coalescing.Coalescer(pause)
    runs = 0

    async def job() -> int:
        nonlocal runs
        runs += 1
        return runs

    loop = asyncio.get_running_loop()
    started = loop.time()
    queue.request("a", job)
    await asyncio.sleep(0.01)
    for _ in range(10):
        queue.request("a", job)  # while it pauses: the same run
    await _idle(queue)
    assert runs == 1 and paused == ["a"]
    assert loop.time() - started >= 0.05
