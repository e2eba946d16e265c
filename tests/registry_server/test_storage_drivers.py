"""One conformance suite for every storage driver: filesystem and S3.

A new backend joins by adding a case to the `driver` fixture; every test then runs on
it. The S3 case runs against a real S3-compatible store (SeaweedFS, the `s3_store`
fixture), each test under a prefix of its own, and is marked `integration` since it needs
that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from registry_server.protocol import digests, errors
from registry_server.storage import filesystem
from registry_server.storage.blobstore import BlobStore, blob_path
from registry_server.storage.driver import StorageDriver, StorageFull, StorageNotFound
from registry_server.storage.filesystem import FilesystemDriver, FileWriter
from registry_server.storage.s3 import S3Driver
from tests.support.s3_store import S3Store

DRIVERS = ["filesystem", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=DRIVERS)
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageDriver]:
    if request.param == "filesystem":
        yield FilesystemDriver(tmp_path / "store")
        return
    store: S3Store = request.getfixturevalue("s3_store")
    s3 = S3Driver(**store.driver_args(store.new_prefix()))
    try:
        yield s3
    finally:
        await s3.close()


async def _collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in it])


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_put_get_stat(driver: StorageDriver) -> None:
    assert await driver.stat("a/b/c") is None
    await driver.put_content("a/b/c", b"hello")
    assert await driver.get_content("a/b/c") == b"hello"
    assert await driver.stat("a/b/c") == 5
    await driver.put_content("a/b/c", b"bye")  # replace
    assert await driver.get_content("a/b/c") == b"bye"


async def test_a_write_that_need_not_survive_a_crash_reads_the_same(
    driver: StorageDriver,
) -> None:
    await driver.put_content("u/1/info", b"first", durable=False)
    await driver.put_content("u/1/info", b"second", durable=False)  # replaced whole
    assert await driver.get_content("u/1/info") == b"second"
    assert await driver.stat("u/1/info") == len(b"second")


async def test_missing_content_raises(driver: StorageDriver) -> None:
    with pytest.raises(StorageNotFound):
        await driver.get_content("nope")
    with pytest.raises(StorageNotFound):
        await _collect(driver.reader("nope"))
    with pytest.raises(StorageNotFound):
        await driver.move("nope", "elsewhere")


async def test_reader_offset_and_length(driver: StorageDriver) -> None:
    data = bytes(range(256)) * 10_000
    await driver.put_content("big", data)
    assert await _collect(driver.reader("big")) == data
    assert await _collect(driver.reader("big", 1000)) == data[1000:]
    assert await _collect(driver.reader("big", 1000, 50)) == data[1000:1050]


async def test_writer_append_and_truncate(driver: StorageDriver) -> None:
    w = await driver.writer("up/data")
    await w.write(b"abc")
    await w.close()
    w = await driver.writer("up/data", append=True)
    assert w.size == 3
    await w.write(b"def")
    await w.commit()
    assert await driver.get_content("up/data") == b"abcdef"
    await driver.truncate("up/data", 2)
    assert await driver.get_content("up/data") == b"ab"


async def test_a_writer_that_hashes_hashes_every_byte_in_order(driver: StorageDriver) -> None:
    """``hash_with``: the hasher sees exactly what was written before ``hashed`` (batches
    hashed where they are written, the rest by ``hashed``), nothing written after it."""
    parts = [os.urandom(n) for n in (1, 5000, 300_000, 1 << 20, 3, (1 << 20) + 7, 10)]
    hasher = hashlib.sha256()
    w = await driver.writer("h/data")
    hashing = w.hash_with(hasher)
    for part in parts:
        if not hashing:
            hasher.update(part)
        await w.write(part)
    await w.hashed()
    await w.write(b"after")
    await w.commit()
    assert hasher.hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()
    assert await driver.get_content("h/data") == b"".join(parts) + b"after"


async def test_a_flushed_writer_shows_its_bytes_in_its_local_file(driver: StorageDriver) -> None:
    """``flush``: what was written is in the file a local driver serves from (the
    clients following a pull-through fill read it there); it stays appendable and the
    commit keeps every byte."""
    parts = [os.urandom(n) for n in (70_000, (1 << 20) + 5, 9)]
    w = await driver.writer("f/data")
    for part in parts:
        await w.write(part)
    await w.flush()
    local = driver.local_path("f/data")
    if local is not None:
        assert local.read_bytes() == b"".join(parts)
    await w.write(b"more")
    await w.commit()
    assert await driver.get_content("f/data") == b"".join(parts) + b"more"


async def test_move_replaces_atomically(driver: StorageDriver) -> None:
    await driver.put_content("src", b"new")
    await driver.put_content("dst/x", b"old")
    await driver.move("src", "dst/x")
    assert await driver.get_content("dst/x") == b"new"
    assert await driver.stat("src") is None


async def test_delete_file_and_tree_idempotent(driver: StorageDriver) -> None:
    await driver.put_content("t/a", b"1")
    await driver.put_content("t/b/c", b"2")
    await driver.delete("t/a")
    assert await driver.stat("t/a") is None
    await driver.delete("t")
    assert await driver.stat("t/b/c") is None
    await driver.delete("t")  # twice is fine


async def test_list(driver: StorageDriver) -> None:
    assert await driver.list("dir") == []
    await driver.put_content("dir/b", b"")
    await driver.put_content("dir/a/x", b"")
    assert await driver.list("dir") == ["a", "b"]


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b"])
async def test_refuses_escaping_paths(driver: StorageDriver, path: str) -> None:
    with pytest.raises(ValueError):
        await driver.put_content(path, b"x")


@pytest.mark.parametrize("path", ["", ".", "./", "./.", "a/..", "/", "//"])
async def test_refuses_the_root(driver: StorageDriver, path: str) -> None:
    """A path must name something below the root: delete("") would take the whole store."""
    await driver.put_content("keep/me", b"x")
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: driver.delete(path),
        lambda: driver.stat(path),
        lambda: driver.list(path),
        lambda: driver.put_content(path, b"x"),
        lambda: driver.get_content(path),
    ]
    for operation in operations:
        with pytest.raises(ValueError):
            await operation()
    assert await driver.get_content("keep/me") == b"x"


async def test_paths_through_a_file_are_absent(driver: StorageDriver) -> None:
    await driver.put_content("file", b"x")
    assert await driver.stat("file/below") is None
    assert await driver.list("file") == []
    assert await driver.list("file/below") == []
    with pytest.raises(StorageNotFound):
        await driver.get_content("file/below")
    with pytest.raises(StorageNotFound):
        await _collect(driver.reader("file/below"))


async def test_filesystem_stat_and_list_leave_the_event_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector walks the whole tree with them: a slow disk must not stall requests.

    The filesystem driver's alone: the S3 driver makes no file system calls, its I/O is
    asynchronous network I/O.
    """
    driver = FilesystemDriver(tmp_path / "store")
    await driver.put_content("d/f", b"x")
    loop_thread = threading.get_ident()
    threads: list[int] = []
    stat, listdir, scandir = os.stat, os.listdir, os.scandir

    def record(real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident())
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "stat", record(stat))
    monkeypatch.setattr(os, "listdir", record(listdir))
    monkeypatch.setattr(os, "scandir", record(scandir))
    assert await driver.stat("d/f") == 1
    assert await driver.list("d") == ["f"]
    monkeypatch.undo()
    assert threads and loop_thread not in threads


# -- the blob store on top of each driver ------------------------------------------------


async def test_upload_commit_and_read(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    data = b"x" * 3_000_000
    digest = digests.of_bytes(data)
    upload = await store.start_upload("repo")
    info = await store.upload_info("repo", upload)
    await store.append(info, _chunks(data[:1000], data[1000:]))
    info = await store.upload_info("repo", upload)
    assert info.size == len(data)
    assert await store.commit(info, digest) == len(data)
    assert await store.size(digest) == len(data)
    assert await _collect(store.read(digest)) == data
    with pytest.raises(errors.RegistryError):
        await store.upload_info("repo", upload)  # gone after commit


async def test_digest_mismatch_leaves_nothing(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    upload = await store.start_upload("repo")
    await store.append(await store.upload_info("repo", upload), _chunks(b"abc"))
    wrong = digests.of_bytes(b"abd")
    with pytest.raises(errors.RegistryError) as exc:
        await store.commit(await store.upload_info("repo", upload), wrong)
    assert exc.value.error is errors.DIGEST_INVALID
    assert await store.size(wrong) is None
    assert await driver.stat(blob_path(digests.of_bytes(b"abc"))) is None


async def test_failed_append_rolls_back_to_offset(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    upload = await store.start_upload("repo")
    await store.append(await store.upload_info("repo", upload), _chunks(b"good"))

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        await store.append(await store.upload_info("repo", upload), broken())
    info = await store.upload_info("repo", upload)
    assert info.size == 4
    await store.append(info, _chunks(b"more"))
    info = await store.upload_info("repo", upload)
    assert await store.commit(info, digests.of_bytes(b"goodmore")) == 8


async def test_resume_after_restart_rehashes(driver: StorageDriver) -> None:
    first = BlobStore(driver)
    upload = await first.start_upload("repo")
    await first.append(await first.upload_info("repo", upload), _chunks(b"part1-"))
    second = BlobStore(driver)  # a new process: no in-memory hash state
    info = await second.upload_info("repo", upload)
    await second.append(info, _chunks(b"part2"))
    info = await second.upload_info("repo", upload)
    expected = hashlib.sha256(b"part1-part2").hexdigest()
    assert await second.commit(info, digests.Digest("sha256", expected)) == 11


async def test_upload_of_other_repository_is_unknown(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    upload = await store.start_upload("repo-a")
    with pytest.raises(errors.RegistryError) as exc:
        await store.upload_info("repo-b", upload)
    assert exc.value.error is errors.BLOB_UPLOAD_UNKNOWN
    for bogus in ("../../etc", "not-a-uuid"):
        with pytest.raises(errors.RegistryError):
            await store.upload_info("repo-a", bogus)


async def test_cancel_twice_is_safe(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    upload = await store.start_upload("repo")
    await store.cancel(upload)
    await store.cancel(upload)


async def test_concurrent_commits_of_same_blob(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    data = b"same" * 100_000
    digest = digests.of_bytes(data)

    async def one() -> int:
        upload = await store.start_upload("repo")
        await store.append(await store.upload_info("repo", upload), _chunks(data))
        return await store.commit(await store.upload_info("repo", upload), digest)

    sizes = await asyncio.gather(*(one() for _ in range(8)))
    assert sizes == [len(data)] * 8
    assert await _collect(store.read(digest)) == data


async def test_stale_uploads(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    upload = await store.start_upload("repo")
    assert await store.stale_uploads(older_than=0) == []
    assert await store.stale_uploads(older_than=1e12) == [upload]
    # The session's data is all the store holds of it: its id names the rest.
    assert await driver.list(f"uploads/{upload}") == ["data"]
    with pytest.raises(errors.RegistryError) as unknown:  # only through its repository
        await store.upload_info("other", upload)
    assert unknown.value.error is errors.BLOB_UPLOAD_UNKNOWN


async def test_a_session_of_the_earlier_form_is_still_served_and_purged(
    driver: StorageDriver,
) -> None:
    """A session an earlier version started (a plain UUID, an info file beside the data)
    is continued, finished and purged as before: an upgrade loses no upload in flight."""
    store = BlobStore(driver)
    legacy = str(uuid.uuid4())
    info_file = json.dumps({"repository": "repo", "started_at": 1000.0}).encode()
    await driver.put_content(f"uploads/{legacy}/info", info_file)
    await (await driver.writer(f"uploads/{legacy}/data")).close()
    info = await store.upload_info("repo", legacy)
    assert (info.started_at, info.size) == (1000.0, 0)
    with pytest.raises(errors.RegistryError):
        await store.upload_info("other", legacy)
    data = b"continued after an upgrade"
    await store.append(info, _chunks(data))
    assert await store.stale_uploads(older_than=999) == []
    assert await store.stale_uploads(older_than=1001) == [legacy]
    digest = digests.of_bytes(data)
    assert await store.commit(await store.upload_info("repo", legacy), digest) == len(data)
    assert await _collect(store.read(digest)) == data
    assert await driver.list(f"uploads/{legacy}") == []  # (SeaweedFS lists empty folders)


async def test_a_lone_body_is_hashed_as_it_arrives_others_by_their_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hash_alone``: a body streaming alone is hashed by the caller (the writer's thread
    only writes); one that starts while another streams is hashed by its writer. Both
    verify, and a caller that does not ask keeps the writer hashing."""
    store = BlobStore(FilesystemDriver(tmp_path / "store"))
    hashing_writers: list[FileWriter] = []
    real = FileWriter.hash_with

    def spy(self: FileWriter, hasher: Any) -> bool:
        hashing_writers.append(self)
        return real(self, hasher)

    monkeypatch.setattr(FileWriter, "hash_with", spy)
    first, second = os.urandom(3 << 20), os.urandom((2 << 20) + 5)
    first_streaming, second_done = asyncio.Event(), asyncio.Event()

    async def first_body() -> AsyncIterator[bytes]:
        yield first[: 1 << 20]
        first_streaming.set()
        await second_done.wait()  # still streaming while the second one runs
        yield first[1 << 20 :]

    async def push(data: bytes, body: AsyncIterator[bytes], **kw: Any) -> int:
        upload = await store.start_upload("repo")
        info = await store.upload_info("repo", upload)
        size = await store.append(info, body, last=digests.of_bytes(data), **kw)
        await store.publish(info, digests.of_bytes(data))
        await store.cancel(upload)
        return size

    lone = asyncio.create_task(push(first, first_body(), hash_alone=True))
    await first_streaming.wait()
    assert await push(second, _chunks(second[:7], second[7:]), hash_alone=True) == len(second)
    assert len(hashing_writers) == 1  # the second body's writer, not the first's
    second_done.set()
    assert await lone == len(first)
    for data in (first, second):
        assert await _collect(store.read(digests.of_bytes(data))) == data

    third = os.urandom(1 << 20)
    assert await push(third, _chunks(third), hash_alone=True) == len(third)
    assert len(hashing_writers) == 1
    fourth = os.urandom(1 << 20)
    assert await push(fourth, _chunks(fourth)) == len(fourth)
    assert len(hashing_writers) == 2
    assert store._streaming == 0

    # A session's PATCHes hashed here, then its PUT by the writer (or the other way
    # round): the hash carried between requests covers both; a body that fails leaves
    # the count as it was and the session where it stood.
    fifth = os.urandom((3 << 20) + 11)
    upload = await store.start_upload("repo")
    await store.append(await store.upload_info("repo", upload), _chunks(fifth[:5]), hash_alone=True)

    async def broken() -> AsyncIterator[bytes]:
        yield b"lost"
        raise ConnectionResetError("the client left")

    with pytest.raises(ConnectionResetError):
        await store.append(await store.upload_info("repo", upload), broken(), hash_alone=True)
    assert store._streaming == 0
    await store.append(await store.upload_info("repo", upload), _chunks(fifth[5 : 2 << 20]))
    info = await store.upload_info("repo", upload)
    digest = digests.of_bytes(fifth)
    last = _chunks(fifth[2 << 20 :])
    assert await store.append(info, last, last=digest, hash_alone=True) == len(fifth)
    await store.publish(info, digest)
    assert await _collect(store.read(digest)) == fifth
    assert len(hashing_writers) == 3  # only the PATCH that did not ask


async def test_a_last_append_verifies_and_makes_the_upload_durable(
    driver: StorageDriver,
) -> None:
    """The final PUT's body goes through the file still open: the digest is checked, the
    data made durable, then published; a mismatch drops the session, stores nothing."""
    store = BlobStore(driver)
    data = b"last" * 300_000
    upload = await store.start_upload("repo")
    await store.append(await store.upload_info("repo", upload), _chunks(data[:1000]))
    info = await store.upload_info("repo", upload)
    digest = digests.of_bytes(data)
    assert await store.append(info, _chunks(data[1000:]), last=digest) == len(data)
    await store.publish(info, digest)
    await store.cancel(upload)
    assert await _collect(store.read(digest)) == data

    other = await store.start_upload("repo")
    wrong = digests.of_bytes(b"not it")
    with pytest.raises(errors.RegistryError) as exc:
        await store.append(await store.upload_info("repo", other), _chunks(b"it"), last=wrong)
    assert exc.value.error is errors.DIGEST_INVALID
    assert await store.size(wrong) is None
    with pytest.raises(errors.RegistryError):
        await store.upload_info("repo", other)  # the session is gone


async def test_a_last_append_with_another_algorithm_rehashes(driver: StorageDriver) -> None:
    store = BlobStore(driver)
    data = b"sha512 content" * 1000
    expected = digests.Digest("sha512", hashlib.sha512(data).hexdigest())
    upload = await store.start_upload("repo")
    info = await store.upload_info("repo", upload)
    assert await store.append(info, _chunks(data[:7], data[7:]), last=expected) == len(data)
    await store.publish(info, expected)
    assert await _collect(store.read(expected)) == data


async def test_a_session_another_process_ended_is_unknown(driver: StorageDriver) -> None:
    here, there = BlobStore(driver), BlobStore(driver)
    upload = await here.start_upload("repo")
    await there.cancel(upload)  # e.g. a DELETE that reached another worker
    with pytest.raises(errors.RegistryError) as exc:
        await here.upload_info("repo", upload)
    assert exc.value.error is errors.BLOB_UPLOAD_UNKNOWN
    with pytest.raises(errors.RegistryError) as exc:
        await here.open_upload("repo", upload)
    assert exc.value.error is errors.BLOB_UPLOAD_UNKNOWN
    assert await driver.stat(f"uploads/{upload}/data") is None  # not made again


async def test_writer_without_create_needs_the_file(driver: StorageDriver) -> None:
    with pytest.raises(StorageNotFound):
        await driver.writer("absent/file", append=True, create=False)
    assert await driver.stat("absent/file") is None
    await driver.put_content("there", b"abc")
    writer = await driver.writer("there", append=True, create=False)
    assert writer.size == 3
    await writer.write(b"def")
    await writer.close()
    assert await driver.get_content("there") == b"abcdef"


async def test_filesystem_writes_survive_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write may take fewer bytes than given (a signal, a nearly full pipe of the
    block layer): the rest is written, in order, by the next calls."""
    driver = FilesystemDriver(tmp_path / "store")
    real, calls = os.write, []

    def short(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real(fd, bytes(data)[: max(1, len(data) // 3)])

    monkeypatch.setattr(os, "write", short)
    parts = [os.urandom(n) for n in (1, 5000, 70_000, 3, 1 << 20)]
    writer = await driver.writer("f")
    for part in parts:
        await writer.write(part)
    await writer.commit()
    monkeypatch.undo()
    assert len(calls) > 2  # the writes were cut short
    assert await driver.get_content("f") == b"".join(parts)


async def test_filesystem_a_file_missing_a_failed_write_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A written-out batch that met a full disk is gone from the file: a commit after
    more writes fails, where it would have made the short file durable as if whole."""
    driver = FilesystemDriver(tmp_path / "store")
    real, full = os.write, [True]

    def maybe_full(fd: int, data: Any) -> int:
        if full[0]:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", maybe_full)
    writer = await driver.writer("f")
    await writer.write(b"a" * 1000)
    with pytest.raises(StorageFull):
        await writer.flush()
    full[0] = False
    await writer.write(b"b" * 10)
    with pytest.raises(OSError, match="short"):
        await writer.commit()
    monkeypatch.undo()
    assert await driver.get_content("f") == b"b" * 10  # what the disk took


async def test_filesystem_a_full_disk_in_a_write_in_flight_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is written by a thread while the next one fills: its ENOSPC comes out of
    a later write (or the commit), the driver is told, and the file is closed."""
    told: list[bool] = []
    driver = FilesystemDriver(tmp_path / "store", on_full=lambda: told.append(True))
    real, calls = os.write, []

    def full_on_second(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full_on_second)
    writer = await driver.writer("f")
    with pytest.raises(StorageFull):
        for _ in range(8):
            await writer.write(b"x" * (1 << 20))
        await writer.commit()
    assert told
    with contextlib.suppress(StorageFull):
        await writer.close()
    assert writer._fd < 0  # closed


async def test_holding_a_file_that_is_not_there_does_not_wait(driver: StorageDriver) -> None:
    async with asyncio.timeout(5), driver.holding("uploads/none/data"):
        pass


async def test_filesystem_holding_waits_for_the_other_holder(tmp_path: Path) -> None:
    """Worker processes of one server take requests for one upload session: a hold is an
    flock, which excludes another open file (another process's, or this one's)."""
    first, second = FilesystemDriver(tmp_path / "store"), FilesystemDriver(tmp_path / "store")
    await first.put_content("uploads/u/data", b"")
    order: list[str] = []
    held = asyncio.Event()

    async def hold_first() -> None:
        async with first.holding("uploads/u/data"):
            held.set()
            order.append("first in")
            await asyncio.sleep(0.2)
            order.append("first out")

    async def hold_second() -> None:
        await held.wait()
        async with second.holding("uploads/u/data"):
            order.append("second in")

    async with asyncio.timeout(5):
        await asyncio.gather(hold_first(), hold_second())
    assert order == ["first in", "first out", "second in"]
    async with asyncio.timeout(5), first.holding("uploads/u/data"):  # all let go
        pass


async def test_a_last_append_verifies_whatever_sessions_start_meanwhile(
    driver: StorageDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store keeps the running hashes of a bounded number of sessions: sessions
    started while a body streams can push out its own. Its check used to look the hash
    up again and rebuild it from the file, which missed what the writer had not written
    out yet: a spurious DIGEST_INVALID (found by review, on a pull-through fill)."""
    monkeypatch.setattr(BlobStore, "max_cached_hashes", 2)
    store = BlobStore(driver)
    data = bytes(range(256)) * 4096 + b"tail"
    upload = await store.start_upload("repo")
    info, writer = await store.open_upload("repo", upload)

    async def body() -> AsyncIterator[bytes]:
        yield data[:1000]
        for _ in range(4):  # pushes elsewhere
            await store.start_upload("other")
        yield data[1000:]

    digest = digests.of_bytes(data)
    assert await store.append(info, body(), last=digest, writer=writer) == len(data)
    await store.publish(info, digest)
    assert await _collect(store.read(digest)) == data


async def test_truncating_a_file_that_is_gone_is_not_found(driver: StorageDriver) -> None:
    with pytest.raises(StorageNotFound):
        await driver.truncate("uploads/gone/data", 0)


async def test_a_body_failing_in_a_session_purged_meanwhile_raises_its_own_error(
    driver: StorageDriver,
) -> None:
    """The purge of stale sessions takes no session lock: an append that fails after it
    removed the session has nothing to cut back, and its client is told its own error
    (it was a 500 for the missing file)."""
    store = BlobStore(driver)
    upload = await store.start_upload("repo")
    info = await store.upload_info("repo", upload)

    async def body() -> AsyncIterator[bytes]:
        yield b"some bytes"
        await store.cancel(upload)  # the purge
        raise errors.RegistryError(errors.BLOB_UPLOAD_INVALID, detail={"reason": "cut"})

    with pytest.raises(errors.RegistryError) as failed:
        await store.append(info, body())
    assert failed.value.error is errors.BLOB_UPLOAD_INVALID


async def test_filesystem_holding_on_a_volume_without_locks_goes_on_unheld(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some NFS and FUSE mounts refuse flock (ENOLCK, EOPNOTSUPP): requests go on as
    they did before holds existed, rather than answering 500 (found by review)."""
    driver = FilesystemDriver(tmp_path / "store")
    await driver.put_content("uploads/u/data", b"")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(filesystem.fcntl, "flock", no_locks)
    async with asyncio.timeout(5), driver.holding("uploads/u/data"):
        pass
    monkeypatch.setattr(filesystem.fcntl, "flock", fcntl.flock)
    async with asyncio.timeout(5), driver.holding("uploads/u/data"):
        pass


async def test_a_failed_fsync_at_commit_ends_the_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the pages it could not write:
    the session kept its data and its running hash, and a retried final PUT published
    the file unchecked once a second fsync succeeded (found by review)."""
    from registry_server.storage import filesystem

    store = BlobStore(FilesystemDriver(tmp_path / "store"))
    data = b"layer" * 1000
    digest = digests.of_bytes(data)
    upload = await store.start_upload("repo")
    await store.append(await store.upload_info("repo", upload), _chunks(data))
    real = filesystem.FileWriter.commit

    async def failing(self: filesystem.FileWriter) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(filesystem.FileWriter, "commit", failing)
    with pytest.raises(OSError):
        await store.commit(await store.upload_info("repo", upload), digest)
    monkeypatch.setattr(filesystem.FileWriter, "commit", real)
    with pytest.raises(errors.RegistryError) as exc:
        await store.commit(await store.upload_info("repo", upload), digest)
    assert exc.value.error is errors.BLOB_UPLOAD_UNKNOWN
    assert await store.size(digest) is None
