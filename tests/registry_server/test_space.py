"""The full-volume gate and the reserve (storage/space.py), and the SQLite index spending
the reserve only for writes that free space."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from registry_server.storage.driver import StorageFull
from registry_server.storage.space import RESERVE_FILE, SpaceMonitor
from registry_server.storage.sqlite_index import SqliteIndex


def test_the_gate_closes_below_the_minimum_and_keeps_a_reserve(tmp_path: Path) -> None:
    space = SpaceMonitor(tmp_path, min_free_bytes=0, reserve_bytes=1 << 20)
    assert space.check() is False
    assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20
    space.require_writable()

    assert space.release_reserve() is True
    assert space.full and space.release_reserve() is False
    with pytest.raises(StorageFull, match="storage full"):
        space.require_writable()
    assert space.check() is False  # room again: the reserve is made first, then it opens
    assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20

    space.min_free_bytes = 1 << 62
    assert space.check() is True
    with pytest.raises(StorageFull):
        space.require_writable()


def test_without_a_root_the_gate_is_always_open() -> None:
    space = SpaceMonitor(None, min_free_bytes=1 << 62, reserve_bytes=1 << 20)
    assert space.check() is False
    space.require_writable()
    assert space.release_reserve() is False


class FullOnce:
    """A writer whose first transaction fails as SQLite does on a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    async def write(
        self, fn: Any, before: Any = None, after: Any = None, key: str | None = None
    ) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return await self.real.write(fn, before, after, key=key)

    def close(self) -> None:
        self.real.close()


async def test_a_delete_spends_the_reserve_a_push_does_not(tmp_path: Path) -> None:
    space = SpaceMonitor(tmp_path, min_free_bytes=0, reserve_bytes=1 << 20)
    space.check()
    index = SqliteIndex(tmp_path / "index.db", space=space)
    try:
        index._writer = FullOnce(index._writer)  # type: ignore[assignment]
        with pytest.raises(StorageFull):
            await index.link_blob("r", "sha256:" + "a" * 64, 1)  # a push: no retry
        assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20
        assert space.full

        index._writer = FullOnce(index._writer.real)  # type: ignore[attr-defined]
        assert await index.delete_tag("r", "latest") is False  # retried and committed
        assert (tmp_path / RESERVE_FILE).stat().st_size == 0
    finally:
        await index.close()
