"""The tag record's group commit (storage/records.py): appends to one file that arrive
while its fdatasync runs share the next one, and none returns before a sync that began
after its own write."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from registry_server.storage.records import TagRecord


async def test_concurrent_appends_share_syncs_and_each_is_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = TagRecord(tmp_path)
    synced_sizes: list[int] = []  # the file's size when each sync began
    real = TagRecord._datasync

    def datasync(path: Path) -> None:
        synced_sizes.append(path.stat().st_size)
        time.sleep(0.01)  # a disk's sync takes time: appends pile up meanwhile
        real(path)

    monkeypatch.setattr(TagRecord, "_datasync", staticmethod(datasync))
    covered: list[bool] = []

    async def push(i: int) -> None:
        await record.append("r", [{"op": "delete_manifest", "digest": f"d{i:04d}"}])
        text = record.path("r").read_bytes()
        end = text.index(f'"d{i:04d}"'.encode()) + 1
        covered.append(any(size >= end for size in synced_sizes))

    await asyncio.gather(*(push(i) for i in range(60)))
    assert covered == [True] * 60
    assert 1 <= len(synced_sizes) < 30, synced_sizes
    lines = record.path("r").read_text().splitlines()
    assert sorted(lines) == sorted(
        f'{{"repo":"r","op":"delete_manifest","digest":"d{i:04d}"}}' for i in range(60)
    )
    assert record._syncs == {}  # nothing kept once every append is durable


async def test_a_failed_sync_fails_its_appends_and_the_next_ones_sync_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = TagRecord(tmp_path)
    real = TagRecord._datasync
    failures = [OSError(5, "Input/output error")]

    def datasync(path: Path) -> None:
        if failures:
            raise failures.pop()
        real(path)

    monkeypatch.setattr(TagRecord, "_datasync", staticmethod(datasync))
    with pytest.raises(OSError):
        await record.append("r", [{"op": "delete_manifest", "digest": "a"}])
    await record.append("r", [{"op": "delete_manifest", "digest": "b"}])
    assert len(record.path("r").read_text().splitlines()) == 2
