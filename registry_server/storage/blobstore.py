"""Content-addressed blobs and upload sessions on top of a storage driver.

An upload session is an id (naming its repository and start: ``upload_ids``), its data,
an offset and an incremental hasher. Commit verifies the
digest, fsyncs, and moves the data into place atomically: no partial file is ever
visible under a digest. The hasher lives in this process; after a restart (or when a
request lands on another worker) it is rebuilt by rehashing the data written so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from registry_server.protocol import digests, errors
from registry_server.storage import upload_ids
from registry_server.storage.driver import (
    StorageConflict,
    StorageDriver,
    StorageFull,
    StorageNotFound,
    Writer,
)
from registry_server.storage.space import SpaceMonitor


def blob_path(digest: digests.Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}/data"


def _blob_dir(digest: digests.Digest) -> str:
    return blob_path(digest).rsplit("/", 1)[0]


_TRASH = "trash"
# Written by `berth-registry backup` (its start time) while it copies: no collection then.
# A running backup's marker, one per backup: ``backups-running/<id>``, holding the time
# it was last refreshed (every BACKUP_REFRESH_SECONDS); one not refreshed for
# BACKUP_STALE_SECONDS was left by a backup that died. The single ``backup-running`` of
# earlier versions, never refreshed, counts for 6 h from its start.
BACKUP_MARKERS = "backups-running"
BACKUP_REFRESH_SECONDS = 60.0
BACKUP_STALE_SECONDS = 600.0
_LEGACY_MARKER = "backup-running"
_LEGACY_STALE = 6 * 3600
# What the readiness probe stats: never written, so the answer is "absent" when all is well.
PROBE_PATH = "readyz-probe"

log = logging.getLogger("registry_server.storage")


def _upload_dir(upload_id: str) -> str:
    return f"uploads/{upload_id}"


def _upload_unknown(upload_id: str) -> errors.RegistryError:
    """For a session that is not there, or vanished mid-request (cancelled by a DELETE, a
    purge, a worker); the id as the client sent it, cut short."""
    return errors.RegistryError(errors.BLOB_UPLOAD_UNKNOWN, detail={"uuid": upload_id[:80]})


@dataclass
class _HashState:
    hasher: hashlib._Hash
    offset: int


@dataclass
class _SessionLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    repository: str
    started_at: float
    size: int


def _stray(path: str) -> None:
    log.warning("not a blob store entry, left alone: %s", path[:300])


class BlobStore:
    # Running hashes are a cache (rebuilt from the data when missing), bounded because with
    # several workers a session often ends in another process, whose cancel cannot clear it.
    max_cached_hashes = 4096

    def __init__(self, driver: StorageDriver, space: SpaceMonitor | None = None) -> None:
        self.driver = driver
        # Pushes are refused while the volume is full (storage.space).
        self.space = space or SpaceMonitor(None)
        self._hashes: OrderedDict[str, _HashState] = OrderedDict()
        # Each session's repository and start time, as its info file says (written once,
        # never changed): read once per process, not on every request of the session.
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._locks: dict[str, _SessionLock] = {}
        self._unreadable: set[str] = set()
        self._streaming = 0  # bodies being appended now, in this process

    # -- blobs ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise if the store does not answer: a stat of a key that need not exist goes
        to the store (an object store's HEAD), where credentials and the bucket count."""
        await self.driver.stat(PROBE_PATH)

    async def size(self, digest: digests.Digest) -> int | None:
        return await self.driver.stat(blob_path(digest))

    def local_path(self, digest: digests.Digest) -> Path | None:
        return self.driver.local_path(blob_path(digest))

    def upload_local_path(self, upload_id: str) -> Path | None:
        """The local file an upload's data is being written to (None on remote backends):
        what is in it is not verified, and it moves on publish (an open descriptor stays
        valid)."""
        return self.driver.local_path(f"{_upload_dir(upload_id)}/data")

    async def redirect_url(self, digest: digests.Digest) -> str | None:
        """Where a client may fetch the blob from the store itself, if the driver says."""
        return await self.driver.redirect_url(blob_path(digest))

    def read(
        self, digest: digests.Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        return self.driver.reader(blob_path(digest), offset, length)

    async def delete(self, digest: digests.Digest) -> None:
        await self.driver.delete(_blob_dir(digest))

    # The collector's two steps: under the index write lock a blob is moved out of sight
    # (one atomic rename), and only once the index has forgotten it for good (committed)
    # is it deleted. A crash or a failed commit in between leaves it in the trash, from
    # where the next round puts it back if the index still records it.

    async def discard(self, digest: digests.Digest) -> str | None:
        """Move a blob into the trash; its trash name, or None if it had no bytes."""
        name = f"{digest.algorithm}-{digest.hex}-{secrets.token_hex(4)}"
        try:
            await self.driver.move(_blob_dir(digest), f"{_TRASH}/{name}")
        except StorageNotFound:
            return None
        return name

    async def empty_trash(self, name: str) -> None:
        await self.driver.delete(f"{_TRASH}/{name}")

    async def trash(self) -> list[tuple[str, digests.Digest]]:
        found = []
        for name in await self.driver.list(_TRASH):
            algorithm, _, rest = name.partition("-")
            text = f"{algorithm}:{rest.rsplit('-', 1)[0]}"
            if digests.is_digest(text):
                found.append((name, digests.parse(text)))
            else:
                _stray(f"{_TRASH}/{name}")
        return found

    async def restore(self, name: str, digest: digests.Digest) -> bool:
        """Put a trashed blob back (under the index write lock) unless it is there again."""
        if await self.size(digest) is not None:
            return False
        await self.driver.move(f"{_TRASH}/{name}", _blob_dir(digest))
        return True

    async def stored(self) -> list[digests.Digest]:
        """Every blob with bytes in storage (a full walk: for the collector's sweep).

        Anything else in the tree is logged and left alone: it is not a blob, so neither
        ours to delete nor a reason to stop the sweep."""
        found = []
        for algorithm in await self.driver.list("blobs"):
            for prefix in await self.driver.list(f"blobs/{algorithm}"):
                for name in await self.driver.list(f"blobs/{algorithm}/{prefix}"):
                    text = f"{algorithm}:{name}"
                    if digests.is_digest(text) and name[:2] == prefix:
                        found.append(digests.parse(text))
                    else:
                        _stray(f"blobs/{algorithm}/{prefix}/{name}")
        return found

    async def put(self, data: bytes) -> digests.Digest:
        """Store small content (e.g. a manifest) under its sha256 digest."""
        digest = digests.of_bytes(data)
        if await self.size(digest) is None:
            await self.driver.put_content(blob_path(digest), data)
        return digest

    async def backup_running(self) -> bool:
        """Whether a backup is under way (of any number running at once)."""
        now = time.time()
        try:
            names = await self.driver.list(BACKUP_MARKERS)
        except StorageNotFound:
            names = []
        for name in names:
            try:
                refreshed = float(await self.driver.get_content(f"{BACKUP_MARKERS}/{name}"))
            except (StorageNotFound, ValueError):
                continue
            if now - refreshed < BACKUP_STALE_SECONDS:
                return True
        try:
            started = float(await self.driver.get_content(_LEGACY_MARKER))
        except (StorageNotFound, ValueError):
            return False
        return now - started < _LEGACY_STALE

    # -- uploads -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, upload_id: str) -> AsyncIterator[None]:
        """Serialise the requests on one upload session: in this process, then against
        other worker processes (the driver's hold on the session's data). Without the
        second, a PATCH in another worker could append to the data while a PUT here
        streams the body it verifies, and the mix be published under the digest.

        The lock exists only while a request holds or awaits it, so ids a client makes up,
        and sessions that ended, leave nothing behind.
        """
        entry = self._locks.setdefault(upload_id, _SessionLock())
        entry.users += 1
        try:
            async with entry.lock:
                if upload_ids.parse(upload_id) is None and not upload_ids.is_legacy(upload_id):
                    yield  # no such session: the request's own lookup answers it
                    return
                async with self.driver.holding(f"{_upload_dir(upload_id)}/data"):
                    yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[upload_id]

    async def start_upload(self, repository: str) -> str:
        self.space.require_writable()
        # The id tells the session's repository and start (upload_ids): its data, empty,
        # is all the store holds of it. Not synced: a session a machine crash loses is
        # answered BLOB_UPLOAD_UNKNOWN and the client starts the upload again; what it
        # uploads is synced when committed.
        upload_id = upload_ids.new(repository, time.time())
        writer = await self.driver.writer(f"{_upload_dir(upload_id)}/data")
        await writer.close()
        self._remember(upload_id, _HashState(hashlib.sha256(), 0))
        return upload_id

    # Sessions of the earlier form (plain UUIDs, started by an earlier version): their
    # repository and start are in an info file, read once per process.

    def _remember_session(self, upload_id: str, repository: str, started_at: float) -> None:
        self._sessions[upload_id] = (repository, started_at)
        self._sessions.move_to_end(upload_id)
        while len(self._sessions) > self.max_cached_hashes:
            self._sessions.popitem(last=False)

    async def _session(self, upload_id: str) -> tuple[str, float] | None:
        known = self._sessions.get(upload_id)
        if known is not None:
            return known
        try:
            raw = json.loads(await self.driver.get_content(f"{_upload_dir(upload_id)}/info"))
            known = (str(raw["repository"]), float(raw["started_at"]))
        except (StorageNotFound, ValueError, KeyError, TypeError):
            return None
        self._remember_session(upload_id, *known)
        return known

    async def upload_info(self, repository: str, upload_id: str) -> UploadInfo:
        started_at = await self._started_at(repository, upload_id)
        # Stated on every request: another process may have written to it, or ended it.
        size = await self.driver.stat(f"{_upload_dir(upload_id)}/data")
        if size is None:
            raise _upload_unknown(upload_id)
        return UploadInfo(upload_id, repository, started_at, size)

    async def open_upload(self, repository: str, upload_id: str) -> tuple[UploadInfo, Writer]:
        """``upload_info`` and the session's data opened for appending, in one step: the
        open tells the size a stat would (one call to the store where there were two).
        The writer is the caller's to pass on (``append``, ``verify``) or close."""
        started_at = await self._started_at(repository, upload_id)
        try:
            writer = await self.driver.writer(
                f"{_upload_dir(upload_id)}/data", append=True, create=False
            )
        except StorageNotFound:
            raise _upload_unknown(upload_id) from None
        return UploadInfo(upload_id, repository, started_at, writer.size), writer

    async def _started_at(self, repository: str, upload_id: str) -> float:
        """The session's start, if it is ``repository``'s; BLOB_UPLOAD_UNKNOWN if not.
        Whether it is there is for the caller's stat or open of its data to find."""
        parsed = upload_ids.parse(upload_id)
        if parsed is not None:
            if parsed.binding != upload_ids.binding(repository):
                raise _upload_unknown(upload_id)
            return parsed.started_at
        session = await self._session(upload_id) if upload_ids.is_legacy(upload_id) else None
        if session is None or session[0] != repository:
            raise _upload_unknown(upload_id)
        return session[1]

    def _remember(self, upload_id: str, state: _HashState) -> None:
        self._hashes[upload_id] = state
        self._hashes.move_to_end(upload_id)
        while len(self._hashes) > self.max_cached_hashes:
            self._hashes.popitem(last=False)

    async def _hash_state(self, upload_id: str, size: int) -> _HashState:
        state = self._hashes.get(upload_id)
        if state is not None and state.offset == size:
            self._hashes.move_to_end(upload_id)
            return state
        # Rebuild: another process wrote part of this upload, or we restarted.
        hasher = hashlib.sha256()
        try:
            async for chunk in self.driver.reader(f"{_upload_dir(upload_id)}/data", 0, size):
                hasher.update(chunk)
        except StorageNotFound:
            raise _upload_unknown(upload_id) from None
        state = _HashState(hasher, size)
        self._remember(upload_id, state)
        return state

    async def _open_data(self, upload_id: str) -> Writer:
        try:
            return await self.driver.writer(f"{_upload_dir(upload_id)}/data", append=True)
        except StorageNotFound:
            raise _upload_unknown(upload_id) from None

    async def append(
        self,
        info: UploadInfo,
        chunks: AsyncIterator[bytes],
        last: digests.Digest | None = None,
        checked: Callable[[], Awaitable[None]] | None = None,
        writer: Writer | None = None,
        hash_alone: bool = False,
    ) -> int:
        """Append a request body to the upload; returns the new size.

        On a truncated or failed body the data is cut back to where it was, so the
        session's offset stays what the client last saw. With ``last`` the body ends the
        upload: it is verified against that digest as ``verify`` does, through the file
        still open (no second open, stat or flush). ``writer``: the data as
        ``open_upload`` opened it (else it is opened here). ``hash_alone``: a body that
        is the only one streaming into the store when it starts is hashed here, piece by
        piece as it arrives, and the writer's thread only writes (the work split over two
        threads); one that starts beside others is hashed by its writer's thread, so the
        event loop does not hash them all one after another.
        """
        path = f"{_upload_dir(info.upload_id)}/data"
        try:
            state = await self._hash_state(info.upload_id, info.size)
        except BaseException:
            if writer is not None:
                await writer.close()
            raise
        if writer is None:
            writer = await self._open_data(info.upload_id)
        if last is not None and last.algorithm == "sha256" and info.size == 0:
            # The whole blob in this body, verified as it streams: an object store writes
            # it where the publish puts it (no copy). Not for other digests, which are
            # checked by reading the file back.
            writer.destine(blob_path(last))
        hasher = state.hasher.copy()
        self._streaming += 1
        try:
            # Hashed where the driver writes (a file's writing thread) when it can, unless
            # this body streams alone. A/B of a lone 256 MiB curl push, 6 runs of 4-5
            # rounds: median +10% (+1% to +27%); crane, the Python client and 64 x 1 MiB
            # pushes unchanged; pull-through fills (whose loop also sends every byte on)
            # slower, so they do not ask for it.
            alone = hash_alone and self._streaming == 1
            by_writer = not alone and writer.hash_with(hasher)
            async for chunk in chunks:
                # Checked per chunk: a stream in flight stops when the volume fills up.
                self.space.require_writable()
                if not by_writer:
                    hasher.update(chunk)
                await writer.write(chunk)
            if last is None:
                await writer.close()
            elif by_writer:
                await writer.hashed()
        except BaseException:
            # What it could not flush is cut anyway; a session removed meanwhile (a
            # conflict on object storage) has nothing to keep.
            with contextlib.suppress(StorageFull, StorageConflict):
                await writer.close()
            # Nothing to cut back in a session purged or ended meanwhile.
            with contextlib.suppress(StorageNotFound):
                await self.driver.truncate(path, info.size)
            self._hashes.pop(info.upload_id, None)
            raise
        finally:
            self._streaming -= 1
        state.hasher = hasher
        state.offset = writer.size
        if last is None:
            return writer.size
        ended = UploadInfo(info.upload_id, info.repository, info.started_at, writer.size)
        return await self._verified(ended, last, checked, writer, hasher)

    async def commit(self, info: UploadInfo, expected: digests.Digest) -> int:
        """Verify and move the upload into place as ``expected``; returns the blob size."""
        size = await self.verify(info, expected)
        await self.publish(info, expected)
        await self.cancel(info.upload_id)
        return size

    async def verify(
        self,
        info: UploadInfo,
        expected: digests.Digest,
        checked: Callable[[], Awaitable[None]] | None = None,
        writer: Writer | None = None,
    ) -> int:
        """Check the digest and make the data durable; returns the size. A mismatch drops
        the session (DIGEST_INVALID) and leaves storage as it was. ``checked`` is awaited
        once the digest matched, before the data is made durable. ``info`` is as
        ``upload_info`` just read it (a session changed since is refused), or as
        ``open_upload`` did with its ``writer``."""
        return await self._verified(info, expected, checked, writer)

    async def _verified(
        self,
        info: UploadInfo,
        expected: digests.Digest,
        checked: Callable[[], Awaitable[None]] | None,
        writer: Writer | None,
        hashed: hashlib._Hash | None = None,
    ) -> int:
        """``verify`` of an upload of ``info.size`` bytes, through ``writer`` if open.
        ``hashed``: the sha256 of those bytes, as the append that wrote them made it. Not
        looked up again: other sessions may have pushed it out of the kept states, and
        a rebuild from the file would miss what ``writer`` has not written out yet."""
        try:
            if expected.algorithm == "sha256" and hashed is not None:
                actual = hashed.hexdigest()
            elif expected.algorithm == "sha256":
                actual = (await self._hash_state(info.upload_id, info.size)).hasher.hexdigest()
            else:
                if writer is not None:  # rehashed from the file: all of it written first
                    await writer.close()
                    writer = None
                actual = await self._rehash(info.upload_id, expected)
            if actual != expected.hex:
                if writer is not None:
                    await writer.close()
                    writer = None
                await self.cancel(info.upload_id)
                raise errors.RegistryError(
                    errors.DIGEST_INVALID,
                    detail={"expected": str(expected), "actual": f"{expected.algorithm}:{actual}"},
                )
            if checked is not None:
                failed: Exception | None = None
                if writer is not None:  # those it releases may read the rest from the file
                    try:
                        await writer.flush()
                    except (StorageFull, OSError) as exc:
                        # The bytes matched: whoever has them from the stream is released
                        # all the same; a client of the (short) file is cut, nothing kept.
                        failed = exc
                await checked()
                if failed is not None:
                    raise failed
            if writer is None:
                writer = await self._open_data(info.upload_id)
                if writer.size != info.size:
                    # The session was cancelled meanwhile (opening its data created a new
                    # file) or written by another process: never published as it is.
                    await writer.close()
                    writer = None
                    await self.cancel(info.upload_id)
                    raise _upload_unknown(info.upload_id)
            # Durability first, then (in publish) an atomic rename: a crash leaves either
            # no blob or a whole one.
            durable, writer = writer, None
            try:
                await durable.commit()
            except (StorageFull, OSError):
                # A failed fsync may have dropped pages the kernel could not write: what
                # the file holds is no longer known to be what was hashed, so a retry
                # must not publish it (its second fsync would succeed). The client
                # uploads it again.
                with contextlib.suppress(StorageFull, OSError):
                    await self.cancel(info.upload_id)
                raise
        finally:
            if writer is not None:
                with contextlib.suppress(StorageFull):
                    await writer.close()
        return info.size

    async def _rehash(self, upload_id: str, expected: digests.Digest) -> str:
        hasher = expected.hasher()
        try:
            async for chunk in self.driver.reader(f"{_upload_dir(upload_id)}/data"):
                hasher.update(chunk)
        except StorageNotFound:
            raise _upload_unknown(upload_id) from None
        return hasher.hexdigest()

    async def publish(self, info: UploadInfo, expected: digests.Digest) -> None:
        """Move verified data into place under its digest. The session, now without data,
        is the caller's to end (``cancel``): not while the index's write lock is held for
        the publish, which other publishes wait for."""
        try:
            await self.driver.move(f"{_upload_dir(info.upload_id)}/data", blob_path(expected))
        except StorageNotFound:  # cancelled since verify()
            raise _upload_unknown(info.upload_id) from None

    async def require(self, digest: digests.Digest, size: int | None = None) -> None:
        """Raise BLOB_UNKNOWN unless the blob's bytes are present, and ``size`` bytes long
        when given (a mount's publish step)."""
        found = await self.size(digest)
        if found is None or (size is not None and found != size):
            raise errors.RegistryError(errors.BLOB_UNKNOWN, detail={"digest": str(digest)})

    async def cancel(self, upload_id: str) -> None:
        """Drop an upload session; safe to call twice."""
        self._hashes.pop(upload_id, None)
        self._sessions.pop(upload_id, None)
        await self.driver.delete(_upload_dir(upload_id))

    async def stale_uploads(self, older_than: float) -> list[str]:
        """Upload sessions started before ``older_than``.

        A session's id tells its start (``upload_ids``). One of the earlier form without
        readable info is either being created right now or broken; it counts as stale
        only if it was already so at the previous call. What interrupted
        driver writes of the same age left (an object store's incomplete multipart
        copies) is removed on the way.
        """
        await self.driver.purge_incomplete(older_than)
        stale = []
        unreadable = set()
        for upload_id in await self.driver.list("uploads"):
            parsed = upload_ids.parse(upload_id)
            if parsed is not None:
                if parsed.started_at < older_than:
                    stale.append(upload_id)
                continue
            if not upload_ids.is_legacy(upload_id):
                _stray(f"uploads/{upload_id}")
                continue
            try:
                raw = json.loads(await self.driver.get_content(f"uploads/{upload_id}/info"))
                started = float(raw["started_at"])
            except (StorageNotFound, ValueError, KeyError, TypeError):
                unreadable.add(upload_id)
                if upload_id in self._unreadable:
                    stale.append(upload_id)
                continue
            if started < older_than:
                stale.append(upload_id)
        self._unreadable = unreadable
        return stale
