"""SQLite index group commit: concurrent plain writes share transactions, each isolated.

Writes that queue while the writer thread is busy run in one transaction, each inside its
own savepoint: one fsync for the group, and a write that fails undoes only itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from registry_server.storage.sqlite_index import SqliteIndex
from registry_server.storage.sqlite_writer import SqliteWriter


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    original = SqliteWriter._run_batch

    def counting(self: SqliteWriter, fns: list[Any]) -> list[tuple[bool, Any]]:
        sizes.append(len(fns))
        return original(self, fns)

    monkeypatch.setattr(SqliteWriter, "_run_batch", counting)
    return sizes


async def test_concurrent_writes_commit_together_and_all_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _count_batches(monkeypatch)
    index = SqliteIndex(tmp_path / "index.db")
    try:
        await asyncio.gather(
            *(index.link_blob(f"repo/{i:03d}", "sha256:" + "a" * 64, 10) for i in range(100))
        )
        assert await index.list_repositories(None, None) == [f"repo/{i:03d}" for i in range(100)]
        assert sum(batches) == 100
        assert len(batches) < 100  # fewer commits than writes
    finally:
        await index.close()
    # Committed for real: a fresh connection sees every link.
    reopened = SqliteIndex(tmp_path / "index.db")
    try:
        assert len(await reopened.list_repositories(None, None)) == 100
    finally:
        await reopened.close()


async def test_a_failing_write_undoes_only_itself(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO repositories(name, created) VALUES ('broken', 0)")
        raise ValueError("refused")

    try:
        results = await asyncio.gather(
            *(index.link_blob(f"ok/{i}", "sha256:" + "b" * 64, 1) for i in range(10)),
            index._writer.write(half_then_fail),
            *(index.link_blob(f"ok/{i}", "sha256:" + "b" * 64, 1) for i in range(10, 20)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], ValueError)
        names = await index.list_repositories(None, None)
        assert "broken" not in names
        assert len(names) == 20
    finally:
        await index.close()


async def test_a_cancelled_caller_does_not_stall_the_others(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        first = asyncio.ensure_future(index.link_blob("a", "sha256:" + "c" * 64, 1))
        cancelled = asyncio.ensure_future(index.link_blob("b", "sha256:" + "c" * 64, 1))
        last = asyncio.ensure_future(index.link_blob("c", "sha256:" + "c" * 64, 1))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait_for(asyncio.gather(first, last), 10)
        assert {"a", "c"} <= set(await index.list_repositories(None, None))
    finally:
        await index.close()
