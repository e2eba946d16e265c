"""The storage's thread pool: results and errors come back to the caller's loop, at most
``max_threads`` threads run, a call cancelled before it started is skipped, and
``shutdown`` ends the threads after what they were given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from registry_server.storage.blocking import BlockingPool


async def test_results_and_errors_come_back() -> None:
    pool = BlockingPool("t", 4)
    assert await pool.call(lambda a, b=0: a + b, 2, b=3) == 5

    def fail() -> None:
        raise OSError(28, "full")

    with pytest.raises(OSError) as caught:
        await pool.call(fail)
    assert caught.value.errno == 28
    pool.shutdown()


async def test_runs_side_by_side_up_to_its_size() -> None:
    pool = BlockingPool("t", 3)
    running, most = 0, 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    started = time.monotonic()
    await asyncio.gather(*(pool.call(work) for _ in range(9)))
    assert most == 3
    assert time.monotonic() - started < 9 * 0.05  # not one after another
    assert len(pool._threads) == 3
    pool.shutdown()
    assert pool._threads == []


async def test_a_call_cancelled_before_it_started_does_not_run() -> None:
    pool = BlockingPool("t", 1)
    gate, ran = threading.Event(), []
    blocker = pool.submit(gate.wait)
    queued = pool.submit(ran.append, "ran")
    queued.cancel()
    gate.set()
    await blocker
    assert await pool.call(lambda: "next") == "next"  # the queue moved past it
    assert ran == []
    pool.shutdown()


async def test_shutdown_waits_for_what_runs() -> None:
    pool = BlockingPool("t", 2)
    done: list[bool] = []

    def slow() -> None:
        time.sleep(0.1)
        done.append(True)

    pending = pool.submit(slow)
    await asyncio.sleep(0.01)  # it has started
    await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
    assert done == [True]
    await pending


async def test_a_result_its_caller_left_behind_is_handed_over_to_be_closed() -> None:
    """An open descriptor made after its caller was cancelled (a client gone) is not
    lost: ``call_owned`` hands it to the function that closes it; a caller that waited
    gets it as usual."""
    pool = BlockingPool("t", 1)
    dropped: list[str] = []
    started = threading.Event()

    def slow_open() -> str:
        started.set()
        time.sleep(0.2)
        return "fd"

    task = asyncio.ensure_future(pool.call_owned(dropped.append, slow_open))
    await asyncio.to_thread(started.wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dropped == []
    for _ in range(100):
        if dropped:
            break
        await asyncio.sleep(0.02)
    assert dropped == ["fd"]
    assert await pool.call_owned(dropped.append, lambda: "kept") == "kept"
    assert dropped == ["fd"]
    pool.shutdown()
