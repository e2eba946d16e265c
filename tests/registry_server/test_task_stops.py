"""Stopping background tasks ends them even when a cancellation is lost."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from registry_server.storage.tasks import cancel_and_wait


async def _loses_one_cancellation() -> None:
    # What Python 3.11 can do to a task whose inner wait completes as it is cancelled:
    # the cancellation is gone and the task goes on.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(60)
    await asyncio.sleep(60)


async def test_a_task_that_lost_a_cancellation_is_cancelled_again() -> None:
    task = asyncio.create_task(_loses_one_cancellation())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_and_wait([task, None])
    assert task.cancelled()


async def test_every_task_ends_before_a_failure_is_raised() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    failing = asyncio.create_task(fails())
    sleeping = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait([failing, sleeping])
    assert sleeping.cancelled()


async def test_nothing_to_stop() -> None:
    await cancel_and_wait([])
    await cancel_and_wait([None])
