"""Stopping background tasks so that a stop always ends (used by every layer above)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel the tasks and wait until each has ended. A task is cancelled again every
    second until it has: on Python 3.11 a cancellation that lands as an inner wait
    completes can be lost, and a stop that waited once for such a task waited forever
    (seen in CI, about one stop in fifteen under load). Once all have ended, the first
    failure other than the cancellation is raised."""
    given = [task for task in tasks if task is not None]
    pending = set(given)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1)
    for task in given:
        if not task.cancelled() and task.exception() is not None:
            task.result()
