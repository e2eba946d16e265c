"""The tag record's group commit (storage/records.py): appends to one file that arrive
while its fdatasync runs share the next one, and none returns before a sync that began
after its own write."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from registry_server.protocol import digests, manifests
from registry_server.storage import records
from registry_server.storage.driver import StorageFull
from registry_server.storage.index import TagState
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
    lines = record.path("r").read_text().split()
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
    assert len(record.path("r").read_text().split()) == 2


def _image(n: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "config": {"mediaType": "c", "digest": "sha256:" + "0" * 64, "size": n},
            "layers": [],
        }
    ).encode()


async def test_a_push_again_recorded_before_the_delete_it_followed_is_replayed_kept(
    tmp_path: Path,
) -> None:
    """Lines are appended after their commits by several workers: the index deleted X,
    then a push stored it again and tagged it; the record may hold the push first. The
    rebuild must keep what a live tag (or an index it holds) needs (found by review)."""
    record = TagRecord(tmp_path)
    platform, other = _image(1), _image(2)
    p_digest, o_digest = (str(digests.of_bytes(b)) for b in (platform, other))
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_INDEX,
            "manifests": [{"mediaType": manifests.OCI_MANIFEST, "digest": p_digest, "size": 1}],
        }
    ).encode()
    i_digest = str(digests.of_bytes(index))
    await record.manifest("r", p_digest, manifests.OCI_MANIFEST, platform, [])
    await record.manifest(
        "r", i_digest, manifests.OCI_INDEX, index, [TagState("multi", i_digest, 2, "eu")]
    )
    await record.manifest(
        "r", o_digest, manifests.OCI_MANIFEST, other, [TagState("solo", o_digest, 4, "eu")]
    )
    # Written late: the deletes that came before those pushes in the index.
    await record.removed("r", [p_digest, i_digest, o_digest], [])
    state = record.replay("r")
    assert state.live_tags() == {"multi": i_digest, "solo": o_digest}
    assert set(state.manifests) == {p_digest, i_digest, o_digest}
    # A delete that really happened tombstoned its tag in the same lines: it stays gone.
    await record.deleted("r", o_digest, [TagState("solo", None, 5, "eu")])
    assert o_digest not in record.replay("r").manifests


async def test_a_torn_line_does_not_take_the_next_append_with_it(tmp_path: Path) -> None:
    """A crash or a full volume mid-append leaves a torn last line; the next append was
    glued onto it and its line skipped by the replay (found by review)."""
    record = TagRecord(tmp_path)
    await record.append("r", [{"op": "delete_manifest", "digest": "sha256:" + "0" * 64}])
    torn = record.path("r").read_bytes() + b'{"repo":"r","op":"tag","ta'
    record.path("r").write_bytes(torn)
    await record.manifest("r", "sha256:" + "a" * 64, "application/json", b"{}", [])
    assert list(record.replay("r").manifests) == ["sha256:" + "a" * 64]
    assert list(record.repositories()) == ["r"]


async def test_a_short_write_to_the_record_is_a_full_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its return was not looked at: half a line written counted as recorded."""
    record = TagRecord(tmp_path)
    real_write = os.write
    monkeypatch.setattr(records.os, "write", lambda fd, data: real_write(fd, data[:10]))
    with pytest.raises(StorageFull):
        record.append_blocking("r", [{"op": "delete_manifest", "digest": "sha256:" + "0" * 64}])
