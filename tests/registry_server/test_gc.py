"""Garbage collection: collects only unreferenced blobs past the grace period, never a blob
an upload is publishing at the same moment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from registry_server.app import build_app
from registry_server.config import Config, GcConfig, StorageConfig
from registry_server.protocol import digests
from registry_server.services import gc
from registry_server.services.blobs import BlobService
from registry_server.services.gc import GarbageCollector
from registry_server.storage.blobstore import BlobStore, blob_path
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.index import MetadataIndex, NewManifest
from registry_server.storage.postgres_index import PostgresIndex
from registry_server.storage.sqlite_index import SqliteIndex

Opener = Callable[[], Awaitable[MetadataIndex]]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """The index these collections run against: SQLite, or PostgreSQL (a real server)."""

    async def opener() -> MetadataIndex:
        if request.param == "sqlite":
            return SqliteIndex(tmp_path / "index.db")
        return await PostgresIndex.connect(request.getfixturevalue("postgres_dsn"))

    return opener


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _push(blobs: BlobService, repo: str, data: bytes) -> digests.Digest:
    digest = digests.of_bytes(data)
    await blobs.upload_whole(repo, digest, _body(data))
    return digest


async def test_collects_only_unreferenced_blobs(tmp_path: Path, open_index: Opener) -> None:
    store = BlobStore(FilesystemDriver(tmp_path))
    index = await open_index()
    blobs = BlobService(store, index)
    orphan = await _push(blobs, "r", b"linked, but no manifest wants it")
    kept_by_manifest = await _push(blobs, "r", b"referenced")
    garbage = await _push(blobs, "r", b"garbage")
    await index.put_manifest(
        "r",
        NewManifest(
            "sha256:" + "1" * 64, "x", b"{}", None, None, None, [str(kept_by_manifest)], []
        ),
        ["v1"],
    )
    await blobs.delete("r", kept_by_manifest)  # still referenced by the manifest
    await blobs.delete("r", garbage)
    stale = await store.start_upload("r")

    young = await GarbageCollector(
        store, index, grace_seconds=3600, upload_ttl_seconds=3600
    ).run_once()
    assert young.blobs_deleted == 0 and young.uploads_purged == 0

    report = await GarbageCollector(
        store, index, grace_seconds=-1, upload_ttl_seconds=-1
    ).run_once()
    assert report.blobs_deleted == 2
    assert report.bytes_freed == len(b"garbage") + len(b"linked, but no manifest wants it")
    assert report.uploads_purged == 1
    assert await store.size(garbage) is None
    assert await store.size(orphan) is None
    assert await index.blob_size("r", str(orphan)) is None
    assert await store.size(kept_by_manifest) is not None
    assert stale not in await store.stale_uploads(older_than=1e12)
    await index.close()


async def test_gc_racing_uploads_of_the_same_blob(tmp_path: Path, open_index: Opener) -> None:
    store = BlobStore(FilesystemDriver(tmp_path))
    index = await open_index()
    blobs = BlobService(store, index)
    gc = GarbageCollector(store, index, grace_seconds=-1, upload_ttl_seconds=3600)
    data = b"contested" * 10_000
    for _ in range(20):
        digest = await _push(blobs, "a", data)
        await blobs.delete("a", digest)  # garbage now ...
        # ... while another repository pushes the same content again.
        await asyncio.gather(gc.run_once(), _push(blobs, "b", data))
        # Whatever the interleaving, a linked blob has its bytes. (With no grace period
        # the collector may also take b's fresh link, and the bytes with it.)
        if await index.blob_size("b", str(digest)) is not None:
            assert await store.size(digest) == len(data)
            await blobs.delete("b", digest)
    await index.close()


async def test_a_file_a_crash_left_unrecorded_is_swept(tmp_path: Path, open_index: Opener) -> None:
    """Killed between moving a blob into place and recording it: the file has no row, so
    only the sweep of stored files can find it."""
    driver = FilesystemDriver(tmp_path)
    store = BlobStore(driver)
    index = await open_index()
    blobs = BlobService(store, index)
    kept = await _push(blobs, "r", b"recorded and referenced")
    await index.put_manifest(
        "r", NewManifest("sha256:" + "2" * 64, "x", b"{}", None, None, None, [str(kept)], []), []
    )
    orphan = digests.of_bytes(b"moved into place, never recorded")
    await driver.put_content(blob_path(orphan), b"moved into place, never recorded")
    assert set(await store.stored()) == {kept, orphan}

    report = await GarbageCollector(
        store, index, grace_seconds=3600, upload_ttl_seconds=3600
    ).run_once()
    assert report.orphans_deleted == 1 and report.blobs_deleted == 0
    assert report.bytes_freed == len(b"moved into place, never recorded")
    assert await store.size(orphan) is None
    assert await store.size(kept) is not None
    await index.close()


async def _round_cut_short(store: BlobStore, root: Path) -> digests.Digest:
    """A blob of repository "r" that a round trashed without committing its removal."""
    index = SqliteIndex(root / "index.db")
    digest = await _push(BlobService(store, index), "r", b"still recorded")
    await index.close()

    class CommitFails(SqliteIndex):
        async def forget_blob(self, digest: str, older_than: float, remove: Any = None) -> bool:
            await remove()  # the file is moved away under the lock ...
            raise OSError("disk full")  # ... and the transaction rolls back

    failing = CommitFails(root / "index.db")
    with pytest.raises(OSError):
        await GarbageCollector(store, failing, grace_seconds=-1, upload_ttl_seconds=3600).run_once()
    await failing.close()
    assert await store.size(digest) is None and len(await store.trash()) == 1
    return digest


async def test_a_collection_that_does_not_commit_loses_no_bytes(tmp_path: Path) -> None:
    """The bytes leave only after the index forgot the blob for good: killed (or a failed
    commit) in between, the next round puts them back."""
    store = BlobStore(FilesystemDriver(tmp_path))
    digest = await _round_cut_short(store, tmp_path)
    index = SqliteIndex(tmp_path / "index.db")

    # The next round: recorded, so put back; then collected properly (it is unreferenced).
    collector = GarbageCollector(store, index, grace_seconds=3600, upload_ttl_seconds=3600)
    report = await collector.run_once()
    assert report.blobs_deleted == 0
    assert await store.size(digest) == len(b"still recorded")
    assert await store.trash() == []
    report = await GarbageCollector(
        store, index, grace_seconds=-1, upload_ttl_seconds=3600
    ).run_once()
    assert report.blobs_deleted == 1
    assert await store.size(digest) is None and await store.trash() == []
    await index.close()


@pytest.mark.parametrize("interval", [3600, 0])
async def test_a_restart_puts_the_trash_back_before_any_round(
    tmp_path: Path, interval: int
) -> None:
    """After a crash mid-round, the blob is pulled again as soon as the registry is back,
    not at its next round (an hour by default; never with rounds off)."""
    digest = await _round_cut_short(BlobStore(FilesystemDriver(tmp_path)), tmp_path)
    config = Config(storage=StorageConfig(root=tmp_path), gc=GcConfig(interval_seconds=interval))
    async with TestClient(TestServer(build_app(config))) as client:
        for _ in range(100):
            response = await client.get(f"/v2/r/blobs/{digest}")
            if response.status == 200:
                break
            await asyncio.sleep(0.05)
        assert response.status == 200, await response.text()
        assert await response.read() == b"still recorded"


async def test_stray_entries_in_the_tree_do_not_stop_collection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever else lies under blobs/, trash/ or uploads/ (a stray file, a copy made by
    hand) is skipped and logged: every round still sweeps orphans and purges uploads."""
    driver = FilesystemDriver(tmp_path)
    store = BlobStore(driver)
    index = SqliteIndex(tmp_path / "index.db")
    blobs = BlobService(store, index)
    garbage = await _push(blobs, "r", b"unreferenced")
    orphan = digests.of_bytes(b"never recorded")
    await driver.put_content(blob_path(orphan), b"never recorded")
    misplaced = digests.of_bytes(b"under the wrong prefix")
    strays = [
        "blobs/sha256/ab/not-a-digest/data",
        "blobs/sha256/ab/" + "A" * 64 + "/data",
        "blobs/md5/aa/" + "a" * 32 + "/data",
        f"blobs/sha256/zz/{misplaced.hex}/data",
        "blobs/sha256/file-not-dir",
        "blobs/stray-file",
        "trash/not-a-trash-name",
        "trash/sha256-zzz-0000",
        "uploads/stray-file",
        "uploads/not-an-upload-id/info",
    ]
    for path in strays:
        await driver.put_content(path, b"stray")
    stale = await store.start_upload("r")
    await blobs.delete("r", garbage)

    caplog.set_level("WARNING")
    for _ in range(2):  # twice: an unreadable upload counts as stale only the second time
        report = await GarbageCollector(
            store, index, grace_seconds=-1, upload_ttl_seconds=-1
        ).run_once()
        if report.orphans_deleted:
            assert report.blobs_deleted == 1
    assert await store.size(garbage) is None
    assert await store.size(orphan) is None
    assert stale not in await store.stale_uploads(older_than=1e12)
    for path in strays:  # left alone: not ours to delete
        assert await driver.stat(path) == len(b"stray"), path
    assert "not-a-digest" in caplog.text and "not-a-trash-name" in caplog.text
    assert misplaced.hex in caplog.text and "not-an-upload-id" in caplog.text
    await index.close()


async def test_a_deleted_image_leaves_the_layers_a_push_in_flight_uploaded(
    tmp_path: Path, open_index: Opener
) -> None:
    """A client uploaded a layer (its manifest still to come); another pushed an image
    using it and deleted it. The layer keeps its grace period: the first push's manifest
    finds it. Only while the volume is full (every push refused) does a delete release
    its layers to the next round at once (found by review: it always did)."""
    store = BlobStore(FilesystemDriver(tmp_path))
    index = await open_index()
    try:
        blobs = BlobService(store, index)
        for n, release in enumerate((False, True)):
            layer = await _push(blobs, "r", f"a shared layer {n}".encode())  # in flight
            image = "sha256:" + str(n + 1) * 64
            await index.put_manifest(
                "r",
                NewManifest(image, "x", b"{}", None, None, None, [str(layer)], []),
                ["v1"],
                required_blobs=[str(layer)],
            )
            await asyncio.sleep(0.01)
            assert await index.delete_manifest("r", image, release=release)
            collector = GarbageCollector(store, index, grace_seconds=3600, upload_ttl_seconds=3600)
            report = await collector.run_once()
            assert report.blobs_deleted == int(release)
            assert (await store.size(layer) is None) is release
    finally:
        await index.close()


async def test_the_whole_round_keeps_its_interval_while_the_volume_is_full() -> None:
    """While full, the gate's wait returned early every 2 s and only the prompt round ran:
    retention, the stale-upload purge and the orphan sweep, which may be what frees the
    volume, never ran until someone grew it (found by review)."""
    now = 0.0
    ran: list[tuple[str, float]] = []

    def clock() -> float:
        return now

    async def pressure(seconds: float) -> bool:  # the gate while full: back within 2 s
        nonlocal now
        now += min(seconds, 2.0)
        return seconds > 0

    async def prompt() -> None:
        ran.append(("prompt", now))

    async def whole() -> None:
        nonlocal now
        ran.append(("whole", now))
        rounds = len([r for r in ran if r[0] == "whole"])
        if rounds == 2:
            now += 15.0  # a round longer than the interval: the next waits one after it
        if rounds == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await gc.scheduled_rounds(pressure, 10.0, prompt, whole, clock)
    assert [when for what, when in ran if what == "whole"] == [10.0, 20.0, 45.0]
    assert len([r for r in ran if r[0] == "prompt"]) >= 12
