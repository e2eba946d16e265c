"""Pages of what the caller may see: the index is read in batches in name order and
filtered before paging, so a page holds ``n`` visible items however many are hidden
(the catalog, the usage list, the web UI's repositories)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

BATCH = 100  # rows read at a time, at least


async def visible_page(
    fetch: Callable[[int, str | None], Awaitable[Sequence[T]]],
    name: Callable[[T], str],
    n: int | None,
    last: str | None,
    visible: Callable[[str], Awaitable[bool]],
) -> tuple[list[T], bool]:
    """Up to ``n`` (None: all) items after ``last`` whose names ``visible`` lets through,
    read with ``fetch(limit, after)``; and whether the index has no more after them."""
    out: list[T] = []
    cursor = last
    batch = max(n or 0, BATCH)
    while n is None or len(out) < n:
        items = await fetch(batch, cursor)
        for item in items:
            if n is not None and len(out) == n:
                return out, False  # more rows after them (maybe none visible)
            if await visible(name(item)):
                out.append(item)
        if len(items) < batch:
            return out, True
        cursor = name(items[-1])
    return out, False
