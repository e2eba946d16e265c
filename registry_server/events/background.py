"""The background loops' shared lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence


async def cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel every task, then wait for each to finish unwinding."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
