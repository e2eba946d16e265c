"""A cache fill's order of events for the client that started it (services/pull_through.py).

The client streams the blob while it is stored; its last chunk is held back until the
digest matched. Then the client is done, while the fill makes the blob durable and
publishes it: an fsync of the blob is not its wait. A mismatch never sends the last
chunk. The storage and index are the real ones (filesystem, SQLite); the upstream is a
byte source in memory, since what is tested is the order of the fill's steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from registry_server.protocol import digests, errors
from registry_server.protocol.upstreams import Mirror, UpstreamFailure, UpstreamManifest
from registry_server.services import pull_through
from registry_server.services.pull_through import PullThrough, Settings
from registry_server.storage.blobstore import BlobStore, UploadInfo
from registry_server.storage.driver import StorageFull, Writer
from registry_server.storage.fetch_locks import FileFetchLocks
from registry_server.storage.filesystem import FilesystemDriver, FileWriter
from registry_server.storage.index import NewManifest
from registry_server.storage.sqlite_index import SqliteIndex

CHUNK = 64 * 1024


class GatedStore(BlobStore):
    """Stops a fill after its digest check, before the data is made durable."""

    def __init__(self, root: Path) -> None:
        super().__init__(FilesystemDriver(root))
        self.gate = asyncio.Event()
        self.checked = asyncio.Event()

    async def append(
        self,
        info: UploadInfo,
        chunks: AsyncIterator[bytes],
        last: digests.Digest | None = None,
        checked: Callable[[], Awaitable[None]] | None = None,
        writer: Writer | None = None,
    ) -> int:
        async def then() -> None:
            if checked is not None:
                await checked()
            self.checked.set()
            await self.gate.wait()

        return await super().append(info, chunks, last, then, writer)


def _fill_of(cache: PullThrough, digest: digests.Digest) -> asyncio.Future[None]:
    """The fetch of ``digest`` under way, to wait for its end."""
    task = cache._blob_flights[str(digest)].task
    assert task is not None
    return asyncio.shield(task)


async def _fills_ended(cache: PullThrough) -> bool:
    """Whether every fetch under way ended within a second (one that goes on after its
    client was released has no one awaiting it)."""
    for _ in range(100):
        if not cache._blob_flights:
            return True
        await asyncio.sleep(0.01)
    return not cache._blob_flights


class Bytes:
    """An upstream serving one blob's bytes in chunks."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fetches = 0

    async def manifest(self, repo: str, reference: str, head: bool) -> UpstreamManifest:
        raise AssertionError("no manifest is fetched here")

    async def has_blob(self, repo: str, digest: str) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: str, digest: str
    ) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        self.fetches += 1

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(self.data), CHUNK):
                yield self.data[start : start + CHUNK]

        yield len(self.data), chunks()

    async def close(self) -> None:
        pass


class Recorder:
    """The leading client's response."""

    def __init__(self) -> None:
        self.size: int | None = None
        self.body = bytearray()

    async def start(self, size: int) -> None:
        self.size = size

    async def write(self, chunk: bytes) -> None:
        self.body += chunk

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        assert offset == len(self.body)
        self.body += os.pread(fd, count, offset)


def _pull_through(
    store: BlobStore, index: SqliteIndex, upstream: Bytes, locks: FileFetchLocks | None = None
) -> PullThrough:
    """A cache of the one mirror `mirror` -> `up` over ``store`` and ``index``."""
    return PullThrough(
        [Mirror("up", "mirror", ("up.example",), False)],
        {"up": Settings(60.0, 5.0, 0, 0.0)},
        {"up": upstream},
        store,
        index,
        1 << 20,
        locks=locks,
    )


def _cache(tmp_path: Path, upstream: Bytes) -> tuple[PullThrough, GatedStore, SqliteIndex]:
    store, index = GatedStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    return _pull_through(store, index, upstream), store, index


async def test_the_client_is_done_once_the_digest_matched(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"layer").digest(10 * CHUNK + 123)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    cache, store, index = _cache(tmp_path, upstream)
    client = Recorder()

    # The client has every byte while the fill still waits to make the blob durable.
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, client), 10)
    assert store.checked.is_set() and not store.gate.is_set()
    assert client.size == len(data) and bytes(client.body) == data
    assert await index.blob_size("mirror/app", str(digest)) is None

    # A second client meanwhile follows the fill, verified already: it gets every byte
    # from the upload's file while the fill still makes the blob durable and stores it.
    fill = _fill_of(cache, digest)
    follower = Recorder()
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, follower), 10) is True
    assert follower.size == len(data) and bytes(follower.body) == data
    assert not store.gate.is_set() and not fill.done()
    store.gate.set()
    await asyncio.wait_for(fill, 10)
    assert upstream.fetches == 1
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    assert await store.size(digest) == len(data)
    await cache.close()
    await index.close()


async def test_a_request_that_looked_while_the_fetch_ended_is_served_what_it_stored(
    tmp_path: Path,
) -> None:
    """A request whose look at the store began before a fetch of the blob stored it, and
    ended after the fetch was gone: it looks again and is served the stored blob, where
    it started a second download."""
    data = hashlib.shake_256(b"layer").digest(4 * CHUNK + 5)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    cache, store, index = _cache(tmp_path, upstream)
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, Recorder()), 10)
    flight = cache._blob_flights[str(digest)]
    assert flight.task is not None
    looked = cache._present

    async def late(target: Any, wanted: digests.Digest) -> bool:
        found = await looked(target, wanted)  # not yet stored: False
        store.gate.set()
        assert flight.task is not None
        await asyncio.wait_for(asyncio.shield(flight.task), 10)  # stored, and gone
        return found

    cache._present = late  # type: ignore[method-assign]
    await asyncio.wait_for(cache.blob("mirror/app", digest, None), 10)
    cache._present = looked  # type: ignore[method-assign]
    assert upstream.fetches == 1
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    await cache.close()
    await index.close()


async def test_a_mismatch_never_sends_the_last_chunk(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"layer").digest(4 * CHUNK)
    wrong = digests.of_bytes(b"something else")
    cache, store, index = _cache(tmp_path, Bytes(data))
    client = Recorder()
    with pytest.raises(errors.RegistryError) as caught:
        await asyncio.wait_for(cache.blob("mirror/app", wrong, client), 10)
    assert caught.value.error is errors.UPSTREAM_DIGEST_MISMATCH
    assert bytes(client.body) == data[: 3 * CHUNK]
    assert not store.checked.is_set()
    assert await store.size(wrong) is None
    await cache.close()
    await index.close()


class SlowLink(Recorder):
    """A leading client on a slow link: each write waits for it, ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.writes = 0
        self.from_file = 0

    async def write(self, chunk: bytes) -> None:
        await asyncio.sleep(self.delay)
        self.writes += 1
        await super().write(chunk)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        self.from_file += count
        await super().send_file(fd, offset, count)


async def test_a_slow_leading_client_follows_the_file_and_the_fetch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the fetch has waited its patience for the client whose GET started it, that
    client takes the rest from the file at its own pace: the fetch is verified long
    before the client would have had the bytes written to it, and the client still gets
    every byte, in order (the last ones once they are verified, while the blob is made
    durable)."""
    monkeypatch.setattr(pull_through, "_LEAD_PATIENCE", 0.1)
    data = hashlib.shake_256(b"rollout").digest(40 * CHUNK + 7)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    cache, store, index = _cache(tmp_path, upstream)
    slow = SlowLink(0.05)  # 2 s for the 41 writes the fetch would otherwise wait for
    leader = asyncio.ensure_future(cache.blob("mirror/app", digest, slow))
    await asyncio.wait_for(store.checked.wait(), 10)
    assert slow.writes <= 4  # verified while the client had a few chunks
    fill = _fill_of(cache, digest)
    assert await asyncio.wait_for(leader, 10) is True
    assert slow.size == len(data) and bytes(slow.body) == data
    store.gate.set()
    await asyncio.wait_for(fill, 10)
    assert slow.from_file == len(data) - slow.writes * CHUNK
    assert upstream.fetches == 1
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    await cache.close()
    await index.close()


class Stuck(Recorder):
    """A leading client that stops taking bytes after its first write until ``go`` (a
    node that hangs, or is gone without closing its connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.wrote = asyncio.Event()

    async def write(self, chunk: bytes) -> None:
        if self.body:
            await self.go.wait()
        await super().write(chunk)
        self.wrote.set()


async def test_a_stuck_leading_client_holds_neither_the_fetch_nor_a_follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull_through, "_LEAD_PATIENCE", 0.1)
    data = hashlib.shake_256(b"hang").digest(20 * CHUNK)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    cache, store, index = _cache(tmp_path, upstream)
    store.gate.set()
    stuck = Stuck()
    leader = asyncio.ensure_future(cache.blob("mirror/app", digest, stuck))
    await asyncio.wait_for(stuck.wrote.wait(), 10)  # the fetch is under way
    follower = Recorder()  # follows the file as the fetch writes it
    fill = _fill_of(cache, digest)
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, follower), 10) is True
    assert bytes(follower.body) == data
    await asyncio.wait_for(fill, 10)
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    assert len(stuck.body) == CHUNK and not leader.done()
    stuck.go.set()  # it takes bytes again: the rest from the stored file
    assert await asyncio.wait_for(leader, 10) is True
    assert bytes(stuck.body) == data and upstream.fetches == 1
    await cache.close()
    await index.close()


async def test_a_leading_client_without_a_file_to_follow_paces_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage that cannot be read while written (an object store): the client whose GET
    started the fetch gets every byte written to it, however slow."""
    monkeypatch.setattr(pull_through, "_LEAD_PATIENCE", 0.01)
    data = hashlib.shake_256(b"object").digest(6 * CHUNK)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    cache, store, index = _cache(tmp_path, upstream)
    store.gate.set()
    monkeypatch.setattr(store, "upload_local_path", lambda upload_id: None)
    slow = SlowLink(0.02)
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, slow), 10) is True
    assert bytes(slow.body) == data and slow.from_file == 0 and slow.writes == 6
    await cache.close()
    await index.close()


class FailingStore(GatedStore):
    """The fill fails after the client was released: the publish meets a full disk."""

    async def publish(self, info: UploadInfo, expected: digests.Digest) -> None:
        raise OSError(28, "No space left on device")


async def test_a_fill_failing_after_its_client_is_logged_and_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = hashlib.shake_256(b"layer").digest(3 * CHUNK)
    digest = digests.of_bytes(data)
    upstream = Bytes(data)
    store, index = FailingStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    store.gate.set()
    cache = _pull_through(store, index, upstream)
    client = Recorder()
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, client), 10)
    assert bytes(client.body) == data  # verified bytes, whatever the fill does next
    await _fills_ended(cache)
    assert "pull-through fill failed" in caplog.text
    assert await index.blob_size("mirror/app", str(digest)) is None
    # Nothing stored: the next pull fetches it again (and fails the same way).
    with pytest.raises(OSError):
        await asyncio.wait_for(cache.blob("mirror/app", digest, None), 10)
    assert upstream.fetches == 2
    await cache.close()
    await index.close()


async def test_a_leading_client_behind_the_fetch_gets_every_byte_when_storing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its bytes are verified: a publish that fails afterwards (a full volume) does not
    cut the response of a client that follows the file, as it does not the leader's."""
    monkeypatch.setattr(pull_through, "_LEAD_PATIENCE", 0.05)
    data = hashlib.shake_256(b"full").digest(20 * CHUNK)
    digest = digests.of_bytes(data)
    store, index = FailingStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    store.gate.set()
    cache = _pull_through(store, index, Bytes(data))
    slow = SlowLink(0.02)
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, slow), 10) is True
    assert bytes(slow.body) == data and slow.from_file > 0
    assert await index.blob_size("mirror/app", str(digest)) is None
    await cache.close()
    await index.close()


async def test_a_full_volume_when_the_bytes_matched_still_serves_the_leading_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fill's last buffered writes meet a full volume after the digest matched: the
    client it streamed to gets its last chunk all the same, and nothing is stored."""
    data = hashlib.shake_256(b"no room").digest(5 * CHUNK)
    digest = digests.of_bytes(data)
    store, index = GatedStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    store.gate.set()
    cache = _pull_through(store, index, Bytes(data))

    async def full(self: Writer) -> None:
        raise StorageFull("no space left on the volume")

    monkeypatch.setattr(FileWriter, "flush", full)
    client = Recorder()
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, client), 10) is True
    assert bytes(client.body) == data
    assert await _fills_ended(cache)  # failed
    assert await index.blob_size("mirror/app", str(digest)) is None
    assert await store.size(digest) is None
    await cache.close()
    await index.close()


class Gated(Bytes):
    """An upstream whose bytes wait for ``go``."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.go = asyncio.Event()

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: str, digest: str
    ) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        async with super().blob(repo, digest) as (size, chunks):

            async def gated() -> AsyncIterator[bytes]:
                await self.go.wait()
                async for chunk in chunks:
                    yield chunk

            yield size, gated()


def _process(tmp_path: Path, store: BlobStore, index: SqliteIndex, upstream: Bytes) -> PullThrough:
    """A cache standing for one worker process: its own claims' descriptors over the
    shared storage, index and lock folder."""
    return _pull_through(store, index, upstream, FileFetchLocks(tmp_path / "claims"))


async def test_a_process_waits_for_anothers_fetch_and_serves_what_it_stored(
    tmp_path: Path,
) -> None:
    data = hashlib.shake_256(b"shared").digest(6 * CHUNK)
    digest = digests.of_bytes(data)
    store, index = (
        BlobStore(FilesystemDriver(tmp_path / "storage")),
        SqliteIndex(tmp_path / "index.db"),
    )
    first_up, second_up = Gated(data), Bytes(data)
    first = _process(tmp_path, store, index, first_up)
    second = _process(tmp_path, store, index, second_up)
    leader = asyncio.ensure_future(first.blob("mirror/app", digest, Recorder()))
    await asyncio.sleep(0.1)  # the first process holds the claim and is fetching
    client = Recorder()
    waiting = asyncio.ensure_future(second.blob("mirror/app", digest, client))
    await asyncio.sleep(0.3)
    assert not waiting.done() and first_up.fetches == 1 and second_up.fetches == 0
    first_up.go.set()
    assert await asyncio.wait_for(leader, 10) is True
    # Served from what the first stored: not streamed, not fetched again.
    assert await asyncio.wait_for(waiting, 10) is False
    assert second_up.fetches == 0 and not client.body
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    for cache in (first, second):
        await cache.close()
    await index.close()


async def test_a_claim_held_too_long_is_fetched_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder stuck (an upstream that trickles) holds no pull for good: past the
    patience the other process fetches the blob itself."""
    monkeypatch.setattr(pull_through, "_CLAIM_PATIENCE", 0.3)
    data = hashlib.shake_256(b"stuck").digest(2 * CHUNK)
    digest = digests.of_bytes(data)
    store, index = (
        BlobStore(FilesystemDriver(tmp_path / "storage")),
        SqliteIndex(tmp_path / "index.db"),
    )
    stuck = FileFetchLocks(tmp_path / "claims")
    assert await stuck.try_hold(str(digest))
    upstream = Bytes(data)
    cache = _process(tmp_path, store, index, upstream)
    client = Recorder()
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, client), 10) is True
    assert bytes(client.body) == data and upstream.fetches == 1
    await stuck.close()
    await cache.close()
    await index.close()


async def test_a_descriptor_opened_for_a_request_cancelled_meanwhile_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower (or a leader falling behind) opens the fill's file in a thread; the
    client may leave, or the server stop, before the thread is done."""
    (tmp_path / "data").write_bytes(b"x")
    real_open = os.open

    def slow_open(path: Any, flags: int, *args: Any) -> int:
        time.sleep(0.2)
        return real_open(path, flags, *args)

    def descriptors() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = descriptors()
    monkeypatch.setattr(pull_through.os, "open", slow_open)
    opening = asyncio.ensure_future(pull_through._open_to_read(tmp_path / "data"))
    await asyncio.sleep(0.05)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    monkeypatch.setattr(pull_through.os, "open", real_open)
    await asyncio.sleep(0.5)  # the thread has finished its open
    assert descriptors() == before
    # Not cancelled, it is the caller's.
    fd = await pull_through._open_to_read(tmp_path / "data")
    assert os.read(fd, 1) == b"x"
    os.close(fd)


class NotInA(Bytes):
    """The upstream holds the blob in repository `b`, not in `a` (a 404, after a while)."""

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: str, digest: str
    ) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        if repo == "a":
            self.fetches += 1
            await asyncio.sleep(0.2)
            raise UpstreamFailure("up", "blob GET a: HTTP 404", 404)
        async with super().blob(repo, digest) as fetched:
            yield fetched


async def test_another_repositorys_failed_fetch_is_not_this_ones(tmp_path: Path) -> None:
    """A pull of a digest in `mirror/b` while `mirror/a`'s fetch of it runs waits for that
    fetch, then fetches for `b` when it failed. It got `a`'s BLOB_UNKNOWN (review)."""
    data = hashlib.shake_256(b"in b only").digest(3 * CHUNK)
    digest = digests.of_bytes(data)
    upstream = NotInA(data)
    cache, store, index = _cache(tmp_path, upstream)
    store.gate.set()
    try:
        in_a = asyncio.ensure_future(cache.blob("mirror/a", digest, Recorder()))
        await asyncio.sleep(0.05)
        client = Recorder()
        assert await cache.blob("mirror/b", digest, client)
        assert bytes(client.body) == data
        with pytest.raises(errors.RegistryError) as failed:
            await in_a
        assert failed.value.error is errors.BLOB_UNKNOWN
        assert upstream.fetches == 2
        assert await _fills_ended(cache)
        assert await index.blob_size("mirror/b", str(digest)) == len(data)
    finally:
        await cache.close()
        await index.close()


async def test_closing_lets_a_served_fill_store_its_blob(tmp_path: Path) -> None:
    """At shutdown a fill whose client was served is still making the blob durable and
    indexing it: closing waits for it (bounded) before the index closes under it."""
    data = hashlib.shake_256(b"closing").digest(4 * CHUNK + 5)
    digest = digests.of_bytes(data)
    cache, store, index = _cache(tmp_path, Bytes(data))
    client = Recorder()
    assert await asyncio.wait_for(cache.blob("mirror/app", digest, client), 10)
    closing = asyncio.ensure_future(cache.close())
    await asyncio.sleep(0.2)
    assert not closing.done()
    store.gate.set()
    await asyncio.wait_for(closing, 10)
    assert await index.blob_size("mirror/app", str(digest)) == len(data)
    assert await store.size(digest) == len(data)
    await index.close()


async def test_nodes_pinned_to_a_digest_keep_its_tag_from_eviction(tmp_path: Path) -> None:
    """Pulls by digest (pinned images) count as pulls of the tags pointing at it: the
    tag is not evicted as idle, nor its layers collected, while nodes pull it so
    (found by review: only pulls by tag were counted)."""
    store, index = GatedStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    cache = PullThrough(
        [Mirror("up", "mirror", ("up.example",), False)],
        {"up": Settings(60.0, 5.0, 0, 30.0)},  # evicted after 30 s without a pull
        {"up": Bytes(b"")},
        store,
        index,
        1 << 20,
    )
    try:
        digest = "sha256:" + "d" * 64
        manifest = NewManifest(digest, "application/x-test", b"{}", None, None, None, [], [])
        await index.put_manifest("mirror/app", manifest, ["v1"])
        cache._pulled["mirror/app"] = {"v1": time.time() - 3600}  # by tag: long ago
        assert await cache.manifest("mirror/app", digest) is None  # by digest: now
        assert await cache.evict_once() == 0
        assert await index.resolve_tag("mirror/app", "v1") == digest
        cache._pulled["mirror/app"]["@" + digest] = time.time() - 3600
        assert await cache.evict_once() == 1
        assert await index.resolve_tag("mirror/app", "v1") is None
    finally:
        await cache.close()
        await index.close()


def _image(n: int) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2}
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {**config, "digest": "sha256:" + str(n) * 64},
            "layers": [],
        }
    ).encode()


class Moved(Bytes):
    """An upstream whose tag now points at a new image."""

    def __init__(self, body: bytes) -> None:
        super().__init__(b"")
        self.body = body

    async def manifest(self, repo: str, reference: str, head: bool) -> UpstreamManifest:
        digest = str(digests.of_bytes(self.body))
        media_type = "application/vnd.oci.image.manifest.v1+json"
        return UpstreamManifest(digest, media_type, None if head else self.body)


@pytest.mark.parametrize("pinned", ["no", "here", "by another worker"])
async def test_a_tag_the_upstream_moved_lets_its_old_manifest_go(
    tmp_path: Path, pinned: str
) -> None:
    """With eviction on, the manifest a revalidated tag moved off is deleted (its layers
    then collected), unless nodes pulled it by digest lately, through this worker or
    another: left untagged, it stayed for good (found by review)."""
    store, index = GatedStore(tmp_path / "storage"), SqliteIndex(tmp_path / "index.db")
    old, new = _image(1), _image(2)
    states = tmp_path / "pull-through"
    cache = PullThrough(
        [Mirror("up", "mirror", ("up.example",), False)],
        {"up": Settings(0.0, 5.0, 0, 30.0)},  # revalidated at every pull; eviction on
        {"up": Moved(new)},
        store,
        index,
        1 << 20,
        states,
        0,
    )
    try:
        was = str(digests.of_bytes(old))
        media_type = "application/vnd.oci.image.manifest.v1+json"
        manifest = NewManifest(was, media_type, old, None, None, None, [], [])
        await index.put_manifest("mirror/app", manifest, ["v1"])
        if pinned == "here":
            cache._pulled["mirror/app"] = {"@" + was: time.time()}
        elif pinned == "by another worker":
            states.mkdir()
            other = {"mirror/app": {"@" + was: time.time()}}
            (states / "pulled-1.json").write_text(json.dumps(other))
        assert await cache.manifest("mirror/app", "v1") is None
        assert await index.resolve_tag("mirror/app", "v1") == str(digests.of_bytes(new))
        kept = await index.get_manifest("mirror/app", was) is not None
        assert kept is (pinned != "no")
    finally:
        await cache.close()
        await index.close()
