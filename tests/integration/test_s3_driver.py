"""The S3 driver against a real S3-compatible store (SeaweedFS, the `s3_store` fixture).

What the shared conformance suite (tests/registry_server/test_storage_drivers.py) is too
small to reach: files of several segments, a writer continued by another process,
truncation inside a segment, memory per writer, composition into one object by moves,
a plain object over the copy limit moved in ranged part copies, pre-signed URLs, and
what a crash between a move's copy and its delete, or in the middle of a multipart
copy, leaves for the collector.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_server.protocol import digests, errors
from registry_server.services.blobs import BlobService
from registry_server.services.gc import GarbageCollector
from registry_server.storage import s3
from registry_server.storage.blobstore import BlobStore, blob_path
from registry_server.storage.driver import StorageConflict, StorageNotFound
from registry_server.storage.s3 import _MARKER, S3Driver, _State
from registry_server.storage.sqlite_index import SqliteIndex
from tests.support.clients import pattern_chunks
from tests.support.s3_store import S3Store

pytestmark = pytest.mark.integration

MiB = 1 << 20
PART = 5 * MiB  # the smallest part S3 allows: files of many segments stay small

Drivers = Callable[..., S3Driver]


@pytest.fixture
def prefix(s3_store: S3Store) -> str:
    return s3_store.new_prefix()


@pytest.fixture
async def drivers(s3_store: S3Store, prefix: str) -> AsyncIterator[Drivers]:
    """Factory: S3 drivers on this test's prefix, each standing for a process of its own
    (its own client, nothing shared in memory); closed after the test."""
    made: list[S3Driver] = []

    def make(cls: type[S3Driver] = S3Driver, **options: Any) -> S3Driver:
        options.setdefault("part_size", PART)
        driver = cls(**s3_store.driver_args(prefix), **options)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.close()


def _uneven(data: bytes, sizes: Iterator[int]) -> Iterator[bytes]:
    start = 0
    for size in sizes:
        if start >= len(data):
            return
        yield data[start : start + size]
        start += size


def _cycle(*sizes: int) -> Iterator[int]:
    while True:
        yield from sizes


async def _collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in it])


def _content(size: int, seed: int) -> bytes:
    return b"".join(pattern_chunks(size, MiB, seed))


async def test_a_writer_continued_elsewhere_then_composed(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    first, second = drivers(), drivers()
    data = _content(16 * MiB + 12345, seed=1)
    cut = 7 * MiB + 513

    writer = await first.writer("up/data")
    for chunk in _uneven(data[:cut], _cycle(MiB + 7, 3 * MiB + 1, 4096)):
        await writer.write(chunk)
    await writer.close()
    keys = sorted(s3_store.keys(prefix))
    assert keys[0] == "up/data" and len(keys) == 3, keys  # the state and two segments
    assert [k.split("/")[-1][:6] for k in keys[1:]] == ["000000", "000001"], keys

    # Another process takes the next request: the state lives in the store.
    writer = await second.writer("up/data", append=True)
    assert writer.size == cut
    for chunk in _uneven(data[cut:], _cycle(2 * MiB + 3, 6 * MiB, 77)):
        await writer.write(chunk)
    await writer.commit()
    assert await first.stat("up/data") == len(data)
    assert await first.list("up") == ["data"]  # segment directories are not entries
    for offset, length in [(0, None), (PART - 10, 20), (3 * PART - 1, 2), (cut, None)]:
        end = None if length is None else offset + length
        assert await _collect(first.reader("up/data", offset, length)) == data[offset:end]

    await second.move("up/data", "blobs/b/data")
    assert s3_store.keys(prefix) == ["blobs/b/data"]
    head = s3_store.client().head_object(Bucket=s3_store.bucket, Key=f"{prefix}/blobs/b/data")
    assert head["ContentLength"] == len(data) and not head["Metadata"]
    assert await _collect(first.reader("blobs/b/data")) == data


async def test_a_writer_holds_about_one_part(drivers: Drivers) -> None:
    driver = drivers()
    total = 48 * MiB
    await driver.stat("warm-up")  # the client and its service model, loaded once
    tracemalloc.start()
    try:
        writer = await driver.writer("up/data")
        for chunk in pattern_chunks(total, 256 * 1024, seed=2):
            await writer.write(chunk)
        await writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert await driver.stat("up/data") == total
    # The chunks of the part being filled, that part joined, the one being sent and the
    # client's send buffers (measured: 16 MiB with 5 MiB parts), whatever the file's size.
    assert peak < 4 * PART, f"peak {peak / MiB:.1f} MiB for a {total // MiB} MiB file"


async def test_truncate_inside_a_segment(drivers: Drivers) -> None:
    driver = drivers()
    kept, failed, more = _content(6 * MiB, 3), _content(7 * MiB, 4), _content(2 * MiB, 5)
    writer = await driver.writer("up/data")
    await writer.write(kept)
    await writer.close()
    writer = await driver.writer("up/data", append=True)
    await writer.write(failed)  # rewrites segment 1 as a full part, then a third
    await writer.close()

    await driver.truncate("up/data", len(kept))  # a failed PATCH undone
    assert await driver.stat("up/data") == len(kept)
    assert await driver.get_content("up/data") == kept
    writer = await driver.writer("up/data", append=True)
    await writer.write(more)
    await writer.close()
    assert await driver.get_content("up/data") == kept + more


async def test_a_short_state_rides_on_the_marker_and_a_long_one_is_read(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    """A HEAD tells a short state (the marker carries it: one request per stat); a state
    too long for S3's metadata, or one written with the bare marker, is read from the
    object, with the same answers."""
    driver = drivers()
    client = s3_store.client()

    def written_earlier(path: str, size: int, marker: str) -> None:
        """A one-segment state as an earlier version wrote it, under ``marker``."""
        client.put_object(
            Bucket=s3_store.bucket,
            Key=f"{prefix}/{path}",
            Body=_State(PART, [("000000-cafe", size)]).encode(),
            Metadata={_MARKER: marker},
        )

    writer = await driver.writer("short/data")
    await writer.write(_content(MiB, 8))
    await writer.close()
    head = client.head_object(Bucket=s3_store.bucket, Key=f"{prefix}/short/data")
    marker = head["Metadata"][_MARKER]
    assert marker.startswith("s2:") and marker.endswith(f"={MiB}!"), marker  # exact
    assert await driver.stat("short/data") == MiB
    # A marker of the first version (no exactness) is read as well.
    written_earlier("v1/data", 9, "s1:5242880,000000-cafe=9")
    assert await driver.stat("v1/data") == 9
    assert _State.from_inline("s1:5242880,000000-cafe=9", None) == _State(
        PART, [("000000-cafe", 9)]
    )

    many = _State(PART, [(f"{i:06d}-feedbeef", PART) for i in range(60)] + [("000060-x", 7)])
    assert many.inline() is None
    await driver._put_state(driver._key("long/data"), many, None)
    head = client.head_object(Bucket=s3_store.bucket, Key=f"{prefix}/long/data")
    assert head["Metadata"][_MARKER] == "1"
    assert await driver.stat("long/data") == 60 * PART + 7

    # The bare marker of a state written before states rode on it.
    written_earlier("old/data", 5, "1")
    assert await driver.stat("old/data") == 5
    assert _State.from_inline(many.inline() or "1", None) is None
    short = _State(
        PART,
        [("000000-ab12cd34", PART), ("000001-ab12cd34", 3)],
        exact=frozenset({"000000-ab12cd34"}),
    )
    assert _State.from_inline(short.inline() or "", None) == short
    assert _State.decode(short.encode(), None) == short


async def test_delete_takes_a_path_and_nothing_that_merely_shares_its_prefix(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    driver = drivers()
    for path in ("up/data", "up/info", "update/data", "up.other"):
        writer = await driver.writer(path)
        await writer.write(_content(MiB, 9))
        await writer.close()
    await driver.put_content("up2", b"x")
    assert any(".segments/" in k for k in s3_store.keys(prefix))
    await driver.delete("up")
    assert sorted(k for k in s3_store.keys(prefix) if ".segments/" not in k) == [
        "up.other",
        "up2",
        "update/data",
    ]
    await driver.delete("up.other")  # a segmented file: its segments go with it
    assert not any(k.startswith("up.other") for k in s3_store.keys(prefix))
    assert await driver.get_content("update/data") == _content(MiB, 9)


async def test_a_one_segment_file_moves_exactly_its_recorded_bytes(drivers: Drivers) -> None:
    """A one-segment file is published by copying its segment, unless a truncation left
    the segment longer than the recorded size: the bytes past it must not be published."""
    driver = drivers()
    kept, failed = _content(MiB, 6), _content(MiB, 7)
    writer = await driver.writer("whole/data")
    await writer.write(kept)
    await writer.close()
    await driver.move("whole/data", "blob/a")
    assert await driver.get_content("blob/a") == kept

    writer = await driver.writer("cut/data")
    await writer.write(kept)
    await writer.close()
    writer = await driver.writer("cut/data", append=True)
    await writer.write(failed)  # the tail rewritten as one longer segment
    await writer.close()
    await driver.truncate("cut/data", len(kept))  # a failed PATCH undone
    await driver.move("cut/data", "blob/b")
    assert await driver.stat("blob/b") == len(kept)
    assert await driver.get_content("blob/b") == kept


async def test_of_two_writers_from_one_state_the_first_to_close_wins(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    """A PATCH retried on another replica while the first still runs: both continue the
    same state; the state write is a compare-and-swap, so the file is one writer's, never
    a mix, and the loser's failed-append undo leaves the winner's content alone."""
    one, two = drivers(), drivers()
    start, a, b = _content(6 * MiB, 10), _content(7 * MiB, 11), _content(7 * MiB, 12)
    writer = await one.writer("up/data")
    await writer.write(start)
    await writer.close()

    first = await one.writer("up/data", append=True)
    second = await two.writer("up/data", append=True)
    await first.write(a)
    await second.write(b)  # rewrites the same tail segment, under its own name
    await first.close()
    with pytest.raises(StorageConflict):
        await second.close()
    await two.truncate("up/data", len(start))  # what the blob store does after a failure
    assert await one.get_content("up/data") == start + a
    # Only the winner's segments are left (and the loser's and the replaced tail gone).
    assert len(s3_store.keys(prefix)) == 1 + 3

    # A truncate that races an append does not apply either.
    third = await one.writer("up/data", append=True)
    await third.write(b"x")
    await two.truncate("up/data", 1)  # reads the state, then ...
    with pytest.raises(StorageConflict):
        await third.close()  # ... this writer's state is no longer the current one
    assert await one.stat("up/data") == 1


async def test_plain_objects_can_be_appended_and_truncated(drivers: Drivers) -> None:
    driver = drivers()
    await driver.put_content("p", b"plain")
    writer = await driver.writer("p", append=True)
    assert writer.size == 5
    await writer.write(b"+more")
    await writer.close()
    assert await driver.get_content("p") == b"plain+more"
    await driver.put_content("q", b"0123456789")
    await driver.truncate("q", 4)
    assert await driver.get_content("q") == b"0123"


async def test_a_plain_object_over_the_copy_limit_moves_in_ranged_parts(
    drivers: Drivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One CopyObject copies at most 5 GiB: a larger plain object moves as a multipart
    upload of ranged part copies. The limits scaled down so the store does it for 17 MiB:
    three full pieces and a short last one, each from its own offset."""
    monkeypatch.setattr(s3, "_MAX_COPY", 6 * MiB)
    monkeypatch.setattr(s3, "_BIG_COPY_PIECE", PART)
    driver = drivers()
    data = _content(17 * MiB + 3, seed=9)
    await driver.put_content("big/src", data)
    await driver.move("big/src", "big/dst")
    assert await driver.stat("big/src") is None
    assert await driver.get_content("big/dst") == data
    # Under the limit the single CopyObject still serves.
    await driver.put_content("big/small", data[: 6 * MiB])
    await driver.move("big/small", "big/small2")
    assert await driver.get_content("big/small2") == data[: 6 * MiB]


def _fetch(url: str, byte_range: str | None = None) -> tuple[int, bytes]:
    headers = {"Range": byte_range} if byte_range else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.status, r.read()


async def test_pre_signed_url_serves_the_object(drivers: Drivers, s3_store: S3Store) -> None:
    plain, redirecting = drivers(), drivers(redirect=True, redirect_expiry_seconds=60)
    data = _content(3 * MiB + 1, seed=6)
    await plain.put_content("blobs/b/data", data)
    assert await plain.redirect_url("blobs/b/data") is None
    url = await redirecting.redirect_url("blobs/b/data")
    assert url is not None and url.startswith(s3_store.endpoint)
    assert await asyncio.to_thread(_fetch, url) == (200, data)
    assert await asyncio.to_thread(_fetch, url, "bytes=10-19") == (206, data[10:20])


async def test_an_interrupted_multipart_copy_is_aborted_by_the_upload_purge(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    """A process killed inside a compose leaves a multipart upload no list shows: made
    here as the killed process would have left it."""
    client = s3_store.client()
    key = f"{prefix}/blobs/sha256/ab/{'ab' * 32}/data"
    started = client.create_multipart_upload(Bucket=s3_store.bucket, Key=key)
    client.upload_part(
        Bucket=s3_store.bucket,
        Key=key,
        UploadId=started["UploadId"],
        PartNumber=1,
        Body=_content(PART, seed=7),
    )
    store = BlobStore(drivers())
    await store.stale_uploads(older_than=time.time() - 3600)  # too young: kept
    assert [u["Key"] for u in s3_store.multipart_uploads(prefix)] == [key]
    await store.stale_uploads(older_than=time.time() + 60)
    assert s3_store.multipart_uploads(prefix) == []


async def _destined(driver: S3Driver, path: str, target: str, data: bytes) -> Any:
    """An empty file (a POST's), then a final request's writer into it, destined."""
    await (await driver.writer(path)).close()
    writer = await driver.writer(path, append=True, create=False)
    writer.destine(target)
    for chunk in _uneven(data, _cycle(MiB + 5, 300_000)):
        await writer.write(chunk)
    return writer


async def test_a_destined_file_is_written_where_its_move_puts_it(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    """A part or less is one PUT at the move; more is a multipart upload at the target,
    completed by the move. Nothing is written to the file itself, and nothing is seen
    at the target before the move."""
    driver = drivers()
    for size in (MiB + 3, 2 * PART + 17):
        data = _content(size, seed=size % 251)
        writer = await _destined(driver, "up/data", "blobs/b/data", data)
        await writer.commit()
        assert s3_store.keys(prefix) == ["up/data"]
        assert await driver.stat("up/data") == 0
        assert await driver.stat("blobs/b/data") is None
        assert len(s3_store.multipart_uploads(prefix)) == (0 if size < PART else 1)

        await driver.move("up/data", "blobs/b/data")
        assert sorted(s3_store.keys(prefix)) == ["blobs/b/data", "up/data"]  # left, empty
        assert await _collect(driver.reader("blobs/b/data")) == data
        assert s3_store.multipart_uploads(prefix) == []
        await driver.delete("blobs")
        await driver.delete("up")


async def test_a_destined_file_closed_without_commit_leaves_nothing(
    drivers: Drivers, s3_store: S3Store, prefix: str
) -> None:
    driver = drivers()
    writer = await _destined(driver, "up/data", "blobs/b/data", _content(2 * PART + 1, 10))
    await writer.close()  # the body failed, or did not match its digest
    assert s3_store.keys(prefix) == ["up/data"]
    assert await driver.stat("up/data") == 0
    assert s3_store.multipart_uploads(prefix) == []


async def test_a_committed_destined_file_dropped_unmoved_is_never_published_empty(
    drivers: Drivers, s3_store: S3Store, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staged content whose move does not come (an index that failed to link) is bounded:
    the oldest is dropped, its multipart upload aborted, and its move then fails, where
    moving the empty file would publish nothing under the blob's name. A session's
    deletion drops what it staged too."""
    monkeypatch.setattr(s3, "_STAGED_MAX", 1)
    driver = drivers()
    large, small = _content(2 * PART, 11), b"small"
    await (await _destined(driver, "up/a/data", "blobs/a/data", large)).commit()
    await (await _destined(driver, "up/b/data", "blobs/b/data", small)).commit()
    with pytest.raises(StorageNotFound):
        await driver.move("up/a/data", "blobs/a/data")
    for _ in range(50):  # the abort runs as a task
        if not s3_store.multipart_uploads(prefix):
            break
        await asyncio.sleep(0.1)
    assert s3_store.multipart_uploads(prefix) == []

    await driver.delete("up/b")  # the session cancelled before the publish
    with pytest.raises(StorageNotFound):
        await driver.move("up/b/data", "blobs/b/data")
    assert s3_store.keys(prefix) == ["up/a/data"]


async def test_a_whole_upload_goes_straight_to_its_blob_and_a_wrong_one_nowhere(
    drivers: Drivers, s3_store: S3Store, prefix: str, tmp_path: Path
) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        blobs = BlobService(BlobStore(drivers()), index)
        for data in (b"one request", _content(2 * PART + 5, 12)):
            wrong = digests.of_bytes(data + b"!")
            with pytest.raises(errors.RegistryError) as refused:
                await blobs.upload_whole("r", wrong, _body(data))
            assert refused.value.error is errors.DIGEST_INVALID
            assert s3_store.keys(prefix) == []
            assert s3_store.multipart_uploads(prefix) == []

            digest = digests.of_bytes(data)
            assert await blobs.upload_whole("r", digest, _body(data)) == len(data)
            assert s3_store.keys(prefix) == [blob_path(digest)]
            assert await _collect(blobs.read(digest, 0, len(data))) == data
            await blobs.store.delete(digest)
    finally:
        await index.close()


async def test_requests_to_the_store_per_push_of_a_small_blob(
    drivers: Drivers, tmp_path: Path
) -> None:
    """What one blob's push asks of the store, by flow (each request is store CPU on the
    scale-out setup's critical path): a POST and a final PUT with the body (the blob
    PUT where it belongs), and a POST, a PATCH and a PUT without a body (crane, docker,
    skopeo: the segment copied once, no HEAD of what this process just wrote)."""
    index = SqliteIndex(tmp_path / "index.db")
    driver = drivers()
    try:
        blobs = BlobService(BlobStore(driver), index)
        calls: list[str] = []

        def count(model: Any, **_: Any) -> None:
            calls.append(model.name)

        (await driver._s3()).meta.events.register("before-call.s3.*", count)
        data = _content(MiB, 13)
        upload = await blobs.start_upload("r")
        await blobs.finish_upload("r", upload, digests.of_bytes(data), _body(data))
        assert sorted(calls) == sorted(
            [
                "PutObject",  # the POST: the session's empty data (its id names the rest)
                "HeadObject",  # the PUT opens the data
                "PutObject",  # the publish: the blob (its empty data left to the end)
                "ListObjectsV2",  # the session's end
                "DeleteObjects",
            ]
        ), calls

        calls.clear()
        data = _content(MiB, 14)
        upload = await blobs.start_upload("r")
        await blobs.append("r", upload, _body(data), None)
        await blobs.finish_upload("r", upload, digests.of_bytes(data), None)
        assert sorted(calls) == sorted(
            [
                "PutObject",  # the POST
                "HeadObject",  # the PATCH: its open, a segment, the state
                "PutObject",
                "PutObject",
                "HeadObject",  # the PUT opens the data
                "CopyObject",  # the publish: the segment copied, then deleted with the state
                "DeleteObjects",
                "ListObjectsV2",  # the session's end: nothing left to delete
            ]
        ), calls
    finally:
        await index.close()


class _Crash(Exception):
    """Stands for the process dying at this point."""


class _CrashingDriver(S3Driver):
    """Dies once, at the first delete after ``armed`` is set: between a move's copy and
    its delete (a move's only delete)."""

    armed = False

    async def _delete_keys(self, keys: Any) -> None:
        if self.armed:
            self.armed = False
            raise _Crash
        await super()._delete_keys(keys)


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_crash_between_copy_and_delete_in_a_collection(
    drivers: Drivers, s3_store: S3Store, prefix: str, tmp_path: Path
) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        crashing = drivers(_CrashingDriver)
        assert isinstance(crashing, _CrashingDriver)
        blobs = BlobService(BlobStore(crashing), index)
        data = b"garbage nobody references"
        digest = digests.of_bytes(data)
        await blobs.upload_whole("r", digest, _body(data))
        await blobs.delete("r", digest)  # unlinked: the next round collects it

        crashing.armed = True
        with pytest.raises(_Crash):  # the blob is copied into the trash, not yet deleted
            await GarbageCollector(BlobStore(crashing), index, 0, 3600).run_once()
        left = s3_store.keys(prefix)
        assert blob_path(digest) in left
        assert any(k.startswith("trash/") for k in left), left

        # The next round (another process): the trash copy goes, then the blob itself.
        report = await GarbageCollector(BlobStore(drivers()), index, 0, 3600).run_once()
        assert report.blobs_deleted == 1
        assert s3_store.keys(prefix) == []
    finally:
        await index.close()


async def test_a_crash_between_copy_and_delete_in_a_publish(
    drivers: Drivers, s3_store: S3Store, prefix: str, tmp_path: Path
) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        crashing = drivers(_CrashingDriver)
        assert isinstance(crashing, _CrashingDriver)
        blobs = BlobService(BlobStore(crashing), index)
        data = _content(11 * MiB, seed=8)
        digest = digests.of_bytes(data)
        upload = await blobs.start_upload("r")
        await blobs.append("r", upload, _body(data), None)
        crashing.armed = True
        with pytest.raises(_Crash):  # composed in place, the upload not yet deleted
            await blobs.finish_upload("r", upload, digest, None)
        left = s3_store.keys(prefix)
        assert blob_path(digest) in left and f"uploads/{upload}/data" in left
        assert await index.blob_size("r", str(digest)) is None  # never acknowledged

        # The collector: the blob has no record (deleted as unrecorded), the session is
        # stale (purged).
        report = await GarbageCollector(BlobStore(drivers()), index, 0, 0).run_once()
        assert (report.orphans_deleted, report.uploads_purged) == (1, 1)
        assert s3_store.keys(prefix) == []
    finally:
        await index.close()


async def test_a_state_write_retried_after_it_was_applied_is_its_own_success(
    drivers: Drivers,
) -> None:
    """The store took the conditional PUT but its answer was lost (a proxy's 504); the
    client's retry gets 412 against its own state. That is a success, not a lost race
    whose segments the writer then deleted under the state (found by review)."""
    driver = drivers()
    writer = await driver.writer("up/data")
    await writer.write(_content(6 * MiB, 20))
    await writer.close()
    state = await driver._state(driver._key("up/data"))
    assert state is not None
    grown = _State(state.part_size, [*state.segments, ("000009-feedbeef", 0)], exact=state.exact)
    key = driver._key("up/data")
    applied = await driver._put_state(key, grown, state.etag)  # the store takes it ...
    assert await driver._put_state(key, grown, state.etag) == applied  # ... the retry
    other = _State(state.part_size, [*state.segments, ("000009-0ther000", 0)])
    with pytest.raises(StorageConflict):  # a different writer's state still loses
        await driver._put_state(key, other, state.etag)


async def test_a_writer_losing_to_a_state_built_on_its_own_keeps_those_segments(
    drivers: Drivers, s3_store: S3Store, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our state PUT was applied but its answer lost, and another writer went on from
    it before our retry, which then met a different state: the segments that state
    names are ours and must stay (found by review: deleting them corrupted the file)."""
    driver = drivers()
    start, ours = _content(6 * MiB, 30), _content(6 * MiB, 31)
    writer = await driver.writer("up/data")
    await writer.write(start)
    await writer.close()
    real = driver._put_state

    async def applied_then_superseded(key: str, state: _State, condition: str | None) -> str | None:
        etag = await real(key, state, condition)  # the store took it ...
        grown = _State(
            state.part_size, [*state.segments, ("000099-0ther000", 0)], exact=state.exact
        )
        await real(key, grown, etag)  # ... another writer went on from it ...
        raise StorageConflict(key)  # ... and our retry met that state

    monkeypatch.setattr(driver, "_put_state", applied_then_superseded)
    appending = await driver.writer("up/data", append=True)
    await appending.write(ours)
    with pytest.raises(StorageConflict):
        await appending.close()
    monkeypatch.setattr(driver, "_put_state", real)
    assert await drivers().get_content("up/data") == start + ours
