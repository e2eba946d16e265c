"""SQLite index group commit: concurrent writes share transactions, each isolated.

Writes that queue while the writer thread is busy run in one transaction, each inside its
own savepoint: one fsync for the group, and a write that fails undoes only itself. Blob
links with a publish step join the group: the publishes run under the group's
transaction, never two of one blob at once.
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

    def counting(self: SqliteWriter, fns: list[Any], begin: bool) -> list[tuple[bool, Any]]:
        sizes.append(len(fns))
        return original(self, fns, begin)

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


async def test_links_with_a_publish_step_commit_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _count_batches(monkeypatch)
    index = SqliteIndex(tmp_path / "index.db")
    running: dict[str, int] = {}
    overlapped: list[str] = []
    in_transaction: list[bool] = []

    def publish(digest: str) -> Any:
        async def step() -> None:
            running[digest] = running.get(digest, 0) + 1
            if running[digest] > 1:
                overlapped.append(digest)
            # Held under the group's transaction: the database write lock is taken.
            in_transaction.append(index._writer.conn.in_transaction)
            await asyncio.sleep(0.01)
            running[digest] -= 1

        return step

    blobs = ["sha256:" + c * 64 for c in "abcd"]
    try:
        await asyncio.gather(
            *(
                index.link_blob(f"repo/{i:02d}", blobs[i % 4], 10, publish=publish(blobs[i % 4]))
                for i in range(40)
            )
        )
        assert len(await index.list_repositories(None, None)) == 40
        assert sum(batches) == 40 and len(batches) < 40
        assert not overlapped  # one blob's publishes in turn
        assert all(in_transaction) and len(in_transaction) == 40
    finally:
        await index.close()


async def test_a_failing_publish_undoes_only_its_own_link(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")

    async def fine() -> None:
        await asyncio.sleep(0)

    async def gone() -> None:
        raise FileNotFoundError("the upload was cancelled")

    try:
        results = await asyncio.gather(
            *(index.link_blob(f"ok/{i}", "sha256:" + "e" * 64, 1, publish=fine) for i in range(10)),
            index.link_blob("broken", "sha256:" + "f" * 64, 1, publish=gone),
            return_exceptions=True,
        )
        assert [type(r) for r in results if r is not None] == [FileNotFoundError]
        names = await index.list_repositories(None, None)
        assert "broken" not in names and len(names) == 10
        assert await index.blob_size("broken", "sha256:" + "f" * 64) is None
    finally:
        await index.close()
