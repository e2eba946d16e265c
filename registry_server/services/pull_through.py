"""The pull-through cache: pulls of mirrored repositories fill the local store from the
upstream on a miss, revalidate tags after their TTL, and fall back to the cached copy
when the upstream fails. One upstream fetch per manifest or blob at a time, however
many clients ask (per process). See docs/pull-through-cache.md."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from prometheus_client import Counter

from registry_server.protocol import digests, errors, manifests, names, upstreams
from registry_server.protocol.upstreams import Mirror, Target, UpstreamFailure, UpstreamManifest
from registry_server.storage import blocking
from registry_server.storage.blobstore import BlobStore, UploadInfo
from registry_server.storage.driver import Writer
from registry_server.storage.fetch_locks import FetchLocks, NoFetchLocks
from registry_server.storage.index import MetadataIndex, NewManifest

log = logging.getLogger("registry_server.pull_through")

HITS = Counter("berth_cache_hits_total", "Pulls served from the cache", ["upstream", "kind"])
MISSES = Counter(
    "berth_cache_misses_total", "Pulls fetched from the upstream", ["upstream", "kind"]
)
UPSTREAM_ERRORS = Counter(
    "berth_cache_upstream_errors_total", "Failed upstream requests", ["upstream", "reason"]
)
STALE = Counter(
    "berth_cache_stale_served_total",
    "Cached content served because the upstream failed",
    ["upstream"],
)
BYTES = Counter("berth_cache_upstream_bytes_total", "Bytes fetched from upstreams", ["upstream"])
EVICTED = Counter("berth_cache_evicted_tags_total", "Cached tags evicted", ["upstream"])

# How long one write to the client that leads a fetch may take before it is dropped (the
# fetch, and the clients waiting for it, go on without it).
_SINK_TIMEOUT = 30.0
# How long, in all, a fetch written to a local file waits for its leading client to take
# its bytes: then that client follows the file as the others do, at its own pace, and
# the fetch goes at the upstream's (one slow or stuck node does not hold a rollout's
# others).
_LEAD_PATIENCE = 0.5
# How soon a cached tag whose upstream sent a manifest not matching its digest is asked
# about again (a bad node may answer the next time, or the next client's cache).
_MISMATCH_RECHECK = 30.0
# How often a fetch waiting for another process's claim on the same blob tries again,
# and for how long at most before it fetches unclaimed.
_CLAIM_POLL = 0.1
_CLAIM_PATIENCE = 120.0
_FLUSH_EVERY = 30.0
_PAGE = 500

T = TypeVar("T")


class Fetcher(Protocol):
    name: str

    async def manifest(self, repo: str, reference: str, head: bool) -> UpstreamManifest: ...

    async def has_blob(self, repo: str, digest: str) -> bool: ...

    def blob(
        self, repo: str, digest: str
    ) -> AbstractAsyncContextManager[tuple[int | None, AsyncIterator[bytes]]]: ...

    async def close(self) -> None: ...


class Sink(Protocol):
    """The response of a client of a blob fetch: the one whose request started it (its
    bytes written as they arrive), or one that follows the file as it grows."""

    async def start(self, size: int) -> None: ...
    async def write(self, chunk: bytes) -> None: ...
    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of the open file ``fd`` from ``offset`` (not closed)."""


@dataclass(frozen=True)
class Settings:
    tag_ttl_seconds: float
    timeout_seconds: float
    keep_last: int
    max_idle_seconds: float


@dataclass
class _Flight:
    task: asyncio.Task[None] | None = None
    sink: Sink | None = None
    started: bool = False  # the sink was told the size and got bytes
    pending: bytes | None = None  # the last chunk, held back until the digest is verified
    # Set once the digest matched and the leading client got its last chunk: the client
    # is done while the blob is made durable and published.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # For followers: the blob's size (once the upstream said it), the local file it is
    # being written to (filesystem storage only), and an event replaced at every chunk.
    repository: str = ""  # the mirrored repository the fetch is for
    streaming: bool = False  # the body is arriving: the session (and any path) is made
    size: int | None = None
    path: Path | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    # The leading client's last write, going on while the fetch reads the next chunk;
    # ``sent``: the bytes handed to its writes.
    writing: asyncio.Task[None] | None = None
    sent: int = 0
    waited: float = 0.0  # time the fetch spent waiting for the leading client's writes
    # The leading client fell behind: once its last write is out, it follows the file
    # (open as ``behind_fd``, the handler's to close) for the rest.
    behind: asyncio.Event = field(default_factory=asyncio.Event)
    behind_fd: int | None = None

    def advanced(self) -> None:
        """Wake every follower waiting for more (each waits on the event it saw)."""
        done, self.progress = self.progress, asyncio.Event()
        done.set()


def _reason(failure: UpstreamFailure) -> str:
    if failure.timed_out:
        return "timeout"
    if failure.status is None:
        return "unreachable"
    return "5xx" if failure.status >= 500 else str(failure.status)


def _as_error(failure: UpstreamFailure, unknown: errors.ErrorCode, detail: object) -> Exception:
    if failure.not_found:
        return errors.RegistryError(unknown, detail=detail)
    code = (
        errors.UPSTREAM_TOO_MANY_REQUESTS if failure.rate_limited else errors.UPSTREAM_UNAVAILABLE
    )
    return errors.RegistryError(
        code, detail={"upstream": failure.upstream, "reason": failure.reason}
    )


class PullThrough:
    def __init__(
        self,
        mirrors: Sequence[Mirror],
        settings: Mapping[str, Settings],
        fetchers: Mapping[str, Fetcher],
        store: BlobStore,
        index: MetadataIndex,
        max_manifest_bytes: int,
        state_dir: Path | None = None,
        worker_id: int = 0,
        locks: FetchLocks | None = None,
    ) -> None:
        self.mirrors = tuple(mirrors)
        # Other processes' claims on blob fetches (workers, replicas): see _claim.
        self.locks: FetchLocks = locks if locks is not None else NoFetchLocks()
        self.settings = settings
        self.fetchers = fetchers
        self.store = store
        self.index = index
        self.max_manifest_bytes = max_manifest_bytes
        self._manifest_flights: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._blob_flights: dict[str, _Flight] = {}
        self._fetches_ended = 0  # blob fetches that ended: a look at the store may be stale
        self._checked: dict[tuple[str, str], float] = {}  # (repo, tag) -> monotonic
        # (repo, tag) -> wall time of the last pull: what eviction goes by. Kept in memory
        # and written to state_dir (one file per worker) now and then.
        self._pulled: dict[str, dict[str, float]] = {}
        self._state_dir = state_dir
        self._worker = worker_id
        self._flushed = time.monotonic()

    # -- routing -------------------------------------------------------------------------

    def target(self, name: str, ns: str | None = None) -> Target | None:
        return upstreams.resolve(name, ns, self.mirrors)

    def local_name(self, name: str, ns: str | None) -> str:
        """The repository a request names, containerd's ``ns`` taken into account."""
        target = self.target(name, ns)
        return target.local if target is not None else name

    def require_writable(self, name: str) -> None:
        target = self.target(name)
        if target is not None:
            raise errors.RegistryError(
                errors.CACHE_READ_ONLY,
                detail={"repository": name, "upstream": target.mirror.name},
            )

    # -- manifests -----------------------------------------------------------------------

    async def manifest(self, name: str, reference: str) -> str | None:
        """Make a mirrored manifest current in the index; returns a Warning header value
        when the cached copy is served because the upstream failed. For repositories
        that mirror nothing, does nothing."""
        target = self.target(name)
        if target is None or not (
            digests.looks_like_digest(reference) or names.is_valid_tag(reference)
        ):
            return None
        upstream = target.mirror.name
        if digests.looks_like_digest(reference):
            if await self.index.get_manifest(target.local, reference, content=False) is not None:
                HITS.labels(upstream, "manifest").inc()
            else:
                MISSES.labels(upstream, "manifest").inc()
                await self._single(
                    self._manifest_flights,
                    (target.local, reference),
                    lambda: self._fill_once(target, reference),
                )
            # Nodes pinned to a digest keep the tags that point at it (eviction).
            self._note_pull(target.local, _BY_DIGEST + reference)
            return None
        self._note_pull(target.local, reference)
        cached = await self.index.resolve_tag(target.local, reference)
        settings = self.settings[upstream]
        key = (target.local, reference)
        if cached is None:
            MISSES.labels(upstream, "manifest").inc()
            await self._single(
                self._manifest_flights, key, lambda: self._fill_once(target, reference)
            )
            return None
        if not upstreams.needs_revalidation(
            self._checked.get(key), time.monotonic(), settings.tag_ttl_seconds
        ):
            HITS.labels(upstream, "manifest").inc()
            return None
        try:
            await self._single(
                self._manifest_flights, key, lambda: self._revalidate(target, reference, cached)
            )
        except UpstreamFailure as failure:
            if not upstreams.serves_stale(failure):
                raise _as_error(failure, errors.MANIFEST_UNKNOWN, {"tag": reference}) from None
            STALE.labels(upstream).inc()
            log.warning("serving cached %s:%s: %s", target.local, reference, failure)
            return upstreams.warning(failure)
        HITS.labels(upstream, "manifest").inc()
        return None

    async def _revalidate(self, target: Target, tag: str, cached: str) -> None:
        settings = self.settings[target.mirror.name]
        fetcher = self.fetchers[target.mirror.name]
        try:
            # Bounded: a slow upstream must not hold a pull the cache can answer.
            async with asyncio.timeout(settings.timeout_seconds):
                head = await fetcher.manifest(target.remote, tag, True)
            if head.digest != cached:
                # The wait for another process's claim is not the upstream's time, but
                # it is bounded alike: a pull the cache can answer is not held long.
                claim = f"manifest:{target.local}:{tag}"
                async with self._claimed(claim, settings.timeout_seconds) as waited:
                    if not waited or await self.index.resolve_tag(target.local, tag) != head.digest:
                        async with asyncio.timeout(settings.timeout_seconds):
                            await self._fill(target, tag, revalidating=True)
                        await self._displaced(target, settings, cached)
        except TimeoutError:
            UPSTREAM_ERRORS.labels(target.mirror.name, "timeout").inc()
            raise UpstreamFailure(
                target.mirror.name, f"no answer within {settings.timeout_seconds}s"
            ) from None
        except UpstreamFailure as failure:
            UPSTREAM_ERRORS.labels(target.mirror.name, _reason(failure)).inc()
            raise
        except errors.RegistryError as exc:
            # The tag moved to a manifest this cache refuses (too large, invalid, not
            # its digest): the cached copy is served, and the upstream is asked again
            # after the TTL, not at every pull (a GET is what rate limits count); after
            # half a minute at most for bytes that did not match (one bad CDN node).
            checked = time.monotonic()
            if exc.error is errors.UPSTREAM_DIGEST_MISMATCH:
                checked -= max(0.0, settings.tag_ttl_seconds - _MISMATCH_RECHECK)
            self._checked[(target.local, tag)] = checked
            reason = f"the new manifest of {tag} is refused: {exc.message or exc.error.message}"
            raise UpstreamFailure(target.mirror.name, reason) from None
        self._checked[(target.local, tag)] = time.monotonic()

    async def _displaced(self, target: Target, settings: Settings, digest: str) -> None:
        """The upstream moved a tag off ``digest``. With eviction on, its manifest goes
        now unless another tag or index holds it or nodes pulled it by digest lately
        (then eviction takes it once they stop): left untagged, it and its layers stayed
        for good (found by review)."""
        if not settings.keep_last and not settings.max_idle_seconds:
            return
        try:
            # Every worker's pulls: nodes pinned to it may be another worker's clients.
            pulled = (await self._pull_times()).get(target.local, {})
            if time.time() - pulled.get(_BY_DIGEST + digest, 0.0) < max(
                settings.max_idle_seconds, _DIGEST_MEMORY
            ):
                return
            await self.index.delete_untagged_manifest(target.local, digest)
        except Exception:  # the tag moved and is served; eviction takes it up later
            log.exception("deleting the manifest %s moved off failed", digest)

    async def _fill_once(self, target: Target, reference: str) -> None:
        """``_fill``, claimed across processes: another worker or replica filling the
        same reference is waited for and what it stored is used, without a second GET
        (the one that upstream rate limits count)."""
        async with self._claimed(f"manifest:{target.local}:{reference}") as waited:
            if waited and digests.looks_like_digest(reference):
                found = await self.index.get_manifest(target.local, reference, content=False)
                if found is not None:
                    return
            elif waited and await self.index.resolve_tag(target.local, reference) is not None:
                self._checked[(target.local, reference)] = time.monotonic()
                return
            await self._fill(target, reference)

    async def _fill(self, target: Target, reference: str, revalidating: bool = False) -> None:
        """GET a manifest from the upstream, verify it, store it (tagged for a tag)."""
        fetcher = self.fetchers[target.mirror.name]
        try:
            got = await fetcher.manifest(target.remote, reference, False)
        except UpstreamFailure as failure:
            if revalidating:
                raise  # the caller counts it and serves the cached copy
            UPSTREAM_ERRORS.labels(target.mirror.name, _reason(failure)).inc()
            raise _as_error(failure, errors.MANIFEST_UNKNOWN, {"reference": reference}) from None
        body = got.content or b""
        BYTES.labels(target.mirror.name).inc(len(body))
        is_digest = digests.looks_like_digest(reference)
        expected = reference if is_digest else got.digest
        algorithm = digests.parse(expected).algorithm if expected else "sha256"
        digest = str(digests.of_bytes(body, algorithm))
        if expected is not None and digest != expected:
            UPSTREAM_ERRORS.labels(target.mirror.name, "digest").inc()
            raise errors.RegistryError(
                errors.UPSTREAM_DIGEST_MISMATCH,
                detail={"upstream": target.mirror.name, "expected": expected, "actual": digest},
            )
        if len(body) > self.max_manifest_bytes:
            raise errors.RegistryError(
                errors.MANIFEST_TOO_LARGE,
                detail={"size": len(body), "limit": self.max_manifest_bytes},
            )
        parsed = manifests.parse(body, got.media_type)
        # Blobs and children are fetched when clients ask for them, so none is required.
        await self.index.put_manifest(
            target.local,
            NewManifest(
                digest=digest,
                media_type=parsed.media_type,
                content=body,
                artifact_type=parsed.artifact_type,
                subject=str(parsed.subject.digest) if parsed.subject else None,
                annotations=json.dumps(parsed.annotations) if parsed.annotations else None,
                blob_refs=[str(d.digest) for d in parsed.blobs],
                child_refs=[str(d.digest) for d in parsed.children],
            ),
            [] if is_digest else [reference],
            actor=f"berth:cache:{target.mirror.name}",
        )
        if not is_digest:
            self._checked[(target.local, reference)] = time.monotonic()

    # -- blobs ---------------------------------------------------------------------------

    async def blob(self, name: str, digest: digests.Digest, sink: Sink | None) -> bool:
        """Make a mirrored blob present locally. With ``sink``, when this request starts
        the upstream fetch, the bytes are streamed to it as they arrive and True is
        returned; False means the caller serves the (now local) blob itself. A digest
        mismatch stores nothing and raises (after the sink got all but the last chunk)."""
        target = self.target(name)
        if target is None:
            return False
        upstream = target.mirror.name
        # Twice at most: a request that waited for another's fetch (of this repository
        # or another) looks again at what is now stored.
        for _ in range(2):
            ended = self._fetches_ended
            if await self._present(target, digest):
                HITS.labels(upstream, "blob").inc()
                return False
            flight = self._blob_flights.get(str(digest))
            if flight is None:
                if self._fetches_ended != ended:
                    continue  # one ended while this looked: it may have stored it
                break
            # Another request is fetching it: a whole GET follows the file as it grows;
            # others wait (shielded: a client that goes away does not stop the fetch the
            # others wait for), then look again.
            assert flight.task is not None
            # Only within the fetch's own repository: another one's clients are served
            # once it is stored, linked after this repository's upstream agrees (above).
            if (
                sink is not None
                and flight.repository == target.local
                and await self._follow(flight, sink)
            ):
                HITS.labels(upstream, "blob").inc()
                return True
            if flight.repository == target.local:
                await asyncio.shield(flight.task)
            else:
                # Another repository's fetch (maybe from another upstream): its failure
                # (not found there, a 429, wrong bytes) is not this one's to answer.
                with contextlib.suppress(Exception):
                    await asyncio.shield(flight.task)
        else:  # waited twice: what the last fetch waited for stored, if it did
            if await self._present(target, digest):
                HITS.labels(upstream, "blob").inc()
                return False
        flight = _Flight(sink=sink, repository=target.local)
        task = asyncio.create_task(self._fetch_blob(target, digest, flight))
        flight.task = task
        self._blob_flights[str(digest)] = flight
        task.add_done_callback(lambda done: self._flight_ended(str(digest), done))
        try:
            if sink is not None:
                # The leading client's response ends once its bytes are verified; the
                # fsync and the publish that follow are not its wait.
                released = asyncio.ensure_future(flight.released.wait())
                behind = asyncio.ensure_future(flight.behind.wait())
                try:
                    await asyncio.wait(
                        (task, released, behind), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    released.cancel()
                    behind.cancel()
                if flight.behind.is_set():
                    await self._catch_up(flight, sink)
                    return True
                written = await self._written(flight)
                if flight.released.is_set() and flight.started and written:
                    return True
            await asyncio.shield(task)
        except asyncio.CancelledError:
            flight.sink = None
            raise
        finally:
            if flight.behind_fd is not None:
                os.close(flight.behind_fd)
                flight.behind_fd = None
        return flight.started and flight.sink is not None

    async def _present(self, target: Target, digest: digests.Digest) -> bool:
        """Whether the mirrored repository serves the blob now: stored for it, or stored
        for another repository and linked here once this repository's upstream says it
        serves it too (a digest known from elsewhere must not open a blob this
        repository's upstream would not give)."""
        if await self.index.blob_size(target.local, str(digest)) is not None:
            return True
        size = await self.store.size(digest)
        if size is None:
            return False
        if not await self._upstream_has(target, digest):
            raise errors.RegistryError(errors.BLOB_UNKNOWN, detail={"digest": str(digest)})
        with contextlib.suppress(errors.RegistryError):  # gone meanwhile: fetch it
            await self.index.link_blob(
                target.local, str(digest), size, publish=lambda: self.store.require(digest)
            )
            return True
        return False

    @contextlib.asynccontextmanager
    async def _claimed(self, name: str, patience: float | None = None) -> AsyncIterator[bool]:
        """Hold the claim on fetching ``name`` (a blob's digest, or a manifest reference)
        for the block; yields whether another worker or replica held it first (it lets
        go once it has stored what it fetched, or failed: look again before fetching).
        After ``patience`` seconds without it (a holder stuck on a trickling upstream)
        the block runs unclaimed: a second fetch, never a pull held for good."""
        deadline = time.monotonic() + (_CLAIM_PATIENCE if patience is None else patience)
        waited = False
        # Polled: the claim is another process's, there is no event here to wait on.
        while not (held := await self.locks.try_hold(name)):
            waited = True
            if time.monotonic() >= deadline:
                log.warning("fetching without the claim another process holds: %s", name)
                break
            await asyncio.sleep(_CLAIM_POLL)
        try:
            yield waited
        finally:
            if held:
                await self.locks.release(name)

    async def _follow(self, flight: _Flight, sink: Sink) -> bool:
        """Stream the blob a fetch is writing to ``sink``, from its local file as it
        grows: all but its last byte as written, the rest once the fetch has verified
        it (``_send_file``). False, having sent nothing, when it cannot be followed (object
        storage, no size from the upstream, the fetch ended or the file gone); a fetch
        that fails after the headers went out raises (the caller cuts the body short)."""
        task = flight.task
        assert task is not None
        while flight.path is None or flight.size is None:
            # Once the body streams, the session is made: no path means object storage.
            if task.done() or flight.streaming:
                return False
            await _progress(flight)
        path, size = flight.path, flight.size
        try:
            fd = await _open_to_read(path)
        except FileNotFoundError:  # published (or failed) meanwhile
            return False
        try:
            await sink.start(size)
            await _send_file(flight, sink, fd, 0, size)
        finally:
            os.close(fd)
        return True

    async def _catch_up(self, flight: _Flight, sink: Sink) -> None:
        """The leading client, behind: its last write, then the rest from the file."""
        assert flight.behind_fd is not None and flight.size is not None
        if not await self._written(flight):
            raise ConnectionAbortedError("the client stopped taking the blob's body")
        await _send_file(flight, sink, flight.behind_fd, flight.sent, flight.size)

    @staticmethod
    async def _written(flight: _Flight) -> bool:
        """Once the leading client's last write is over: whether it is still served."""
        if flight.writing is not None:
            await asyncio.wait((flight.writing,))
        return flight.sink is not None

    async def _upstream_has(self, target: Target, digest: digests.Digest) -> bool:
        """Whether the upstream serves the blob in the mirrored repository (within the
        upstream's timeout); when it cannot say, the pull fails as a fetch would."""
        settings = self.settings[target.mirror.name]
        try:
            async with asyncio.timeout(settings.timeout_seconds):
                return await self.fetchers[target.mirror.name].has_blob(target.remote, str(digest))
        except TimeoutError:
            UPSTREAM_ERRORS.labels(target.mirror.name, "timeout").inc()
            failure = UpstreamFailure(
                target.mirror.name, f"no answer within {settings.timeout_seconds}s"
            )
        except UpstreamFailure as exc:
            UPSTREAM_ERRORS.labels(target.mirror.name, _reason(exc)).inc()
            failure = exc
        raise _as_error(failure, errors.BLOB_UNKNOWN, {"digest": str(digest)})

    def _flight_ended(self, digest: str, task: asyncio.Task[None]) -> None:
        self._fetches_ended += 1
        flight = self._blob_flights.get(digest)
        if flight is not None and flight.task is task:  # not a later fetch of the same
            del self._blob_flights[digest]
        # A fill that failed after its client was released (the fsync or the publish) has
        # no one awaiting it: it is said here, and the next pull fetches the blob again.
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, errors.RegistryError):
            log.warning(
                "pull-through fill failed", extra={"digest": digest, "error": repr(exc)[:300]}
            )

    async def _fetch_blob(self, target: Target, digest: digests.Digest, flight: _Flight) -> None:
        async with self._claimed(str(digest)) as waited:
            # Another process may have stored it while this one waited for the claim.
            if waited and await self._present(target, digest):
                HITS.labels(target.mirror.name, "blob").inc()
            else:
                MISSES.labels(target.mirror.name, "blob").inc()  # fetched from upstream
                await self._fetch_claimed(target, digest, flight)

    async def _fetch_claimed(self, target: Target, digest: digests.Digest, flight: _Flight) -> None:
        fetcher = self.fetchers[target.mirror.name]
        counter = BYTES.labels(target.mirror.name)

        async def tee(size: int | None, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            flight.size, flight.streaming = size, True
            async for chunk in chunks:
                counter.inc(len(chunk))
                await self._to_sink(flight, size, chunk)
                yield chunk
                flight.advanced()  # the writer has it: followers look at the file again

        # The session is made while the upstream is asked: neither waits for the other.
        session = asyncio.ensure_future(self._new_session(target.local))
        used = False
        try:
            async with fetcher.blob(target.remote, str(digest)) as (size, chunks):
                upload_id, info, writer = await session
                used = True
                flight.path = self.store.upload_local_path(upload_id)
                try:
                    try:
                        stored = await self.store.append(
                            info,
                            tee(size, chunks),
                            last=digest,
                            checked=lambda: self._release(flight),
                            writer=writer,
                        )
                    except errors.RegistryError as exc:
                        if exc.error is errors.DIGEST_INVALID:
                            UPSTREAM_ERRORS.labels(target.mirror.name, "digest").inc()
                            raise errors.RegistryError(
                                errors.UPSTREAM_DIGEST_MISMATCH,
                                detail={"upstream": target.mirror.name, **(exc.detail or {})},
                            ) from None
                        raise
                    await self.index.link_blob(
                        target.local,
                        str(digest),
                        stored,
                        publish=lambda: self.store.publish(info, digest),
                    )
                finally:  # stored or not, the session has served
                    await self.store.cancel(upload_id)
        except UpstreamFailure as failure:
            UPSTREAM_ERRORS.labels(target.mirror.name, _reason(failure)).inc()
            raise _as_error(failure, errors.BLOB_UNKNOWN, {"digest": str(digest)}) from None
        finally:
            if not used:
                await self._drop_session(session)

    async def _new_session(self, repository: str) -> tuple[str, UploadInfo, Writer]:
        upload_id = await self.store.start_upload(repository)
        try:
            info, writer = await self.store.open_upload(repository, upload_id)
        except BaseException:
            await self.store.cancel(upload_id)
            raise
        return upload_id, info, writer

    async def _drop_session(self, session: asyncio.Future[tuple[str, UploadInfo, Writer]]) -> None:
        """The fetch failed before it wrote: the session made for it goes."""
        try:
            upload_id, _, writer = await session
        except Exception:  # it was not made (a full volume): nothing to drop
            return
        await writer.close()
        await self.store.cancel(upload_id)

    async def _release(self, flight: _Flight) -> None:
        """The digest matched: the leading client gets the chunk held back (one that
        follows the file gets it from there)."""
        pending, flight.pending = flight.pending, None
        if flight.started and pending is not None:
            await self._lead(flight, pending)
        flight.released.set()

    async def _to_sink(self, flight: _Flight, size: int | None, chunk: bytes) -> None:
        """Send the previous chunk to the leading client, hold this one back."""
        if flight.sink is None or size is None:
            flight.sink = None
            return
        previous, flight.pending = flight.pending, chunk
        if not flight.started:
            try:
                async with asyncio.timeout(_SINK_TIMEOUT):
                    await flight.sink.start(size)
                flight.started = True
            except Exception:  # the client is gone or stalled: the fetch goes on without it
                flight.sink = None
                return
        if previous is not None:
            await self._lead(flight, previous)

    async def _lead(self, flight: _Flight, chunk: bytes) -> None:
        """Hand ``chunk`` to the leading client (unless it is gone or behind): written
        by a task of its own while the fetch reads on, once the previous one is out.
        When the fetch has waited ``_LEAD_PATIENCE`` in all for those writes, the client
        follows the file for the rest, and the write in progress goes on without the
        fetch. Without a local file the client paces the fetch."""
        sink = flight.sink
        if sink is None or flight.behind.is_set():
            return
        previous = flight.writing
        if previous is not None and not previous.done():
            # Its turn first: a write the connection takes is over then, and the wait
            # below (futures, a timer) is only for one the client holds back.
            await asyncio.sleep(0)
        if previous is not None and not previous.done():
            if flight.path is None:
                await asyncio.wait((previous,))
            else:
                began = time.monotonic()
                await asyncio.wait((previous,), timeout=max(_LEAD_PATIENCE - flight.waited, 0.0))
                flight.waited += time.monotonic() - began
                if not previous.done():
                    await self._fall_behind(flight, sink)
                    return
        if flight.sink is None:  # that write failed
            return
        flight.sent += len(chunk)
        flight.writing = asyncio.ensure_future(_write(flight, sink, chunk))

    async def _fall_behind(self, flight: _Flight, sink: Sink) -> None:
        """The leading client takes the rest from the file, as followers do."""
        assert flight.path is not None
        try:
            fd = await _open_to_read(flight.path)
        except OSError:  # not while the fetch writes it; the client is dropped if so
            flight.sink = None
            return
        if flight.sink is not sink:  # the client left meanwhile
            os.close(fd)
            return
        flight.behind_fd = fd
        flight.behind.set()

    async def _single(
        self,
        flights: dict[tuple[str, str], asyncio.Task[None]],
        key: tuple[str, str],
        start: Callable[[], Awaitable[None]],
    ) -> None:
        task = flights.get(key)
        if task is None:

            async def run() -> None:
                await start()

            task = asyncio.create_task(run())
            flights[key] = task
            task.add_done_callback(lambda _: flights.pop(key, None))
        await asyncio.shield(task)

    # -- eviction ------------------------------------------------------------------------

    def _note_pull(self, repo: str, tag: str) -> None:
        self._pulled.setdefault(repo, {})[tag] = time.time()
        if self._state_dir is not None and time.monotonic() - self._flushed > _FLUSH_EVERY:
            self._flushed = time.monotonic()
            self._forget_old_digests()
            snapshot = json.dumps(self._pulled)
            path = self._state_dir / f"pulled-{self._worker}.json"
            task = asyncio.get_running_loop().run_in_executor(None, _write_atomic, path, snapshot)
            task.add_done_callback(lambda f: f.exception())  # logged by nobody; retried later

    def _forget_old_digests(self) -> None:
        """Pull times by digest older than any eviction looks at go (each worker keeps
        its own; eviction, in one of them, has deleted what they kept)."""
        idle = max((s.max_idle_seconds for s in self.settings.values()), default=0.0)
        oldest = time.time() - 2 * max(idle, _DIGEST_MEMORY)
        for times in self._pulled.values():
            for key in [k for k, t in times.items() if k.startswith(_BY_DIGEST) and t < oldest]:
                del times[key]

    async def _pull_times(self) -> dict[str, dict[str, float]]:
        merged: dict[str, dict[str, float]] = {}
        if self._state_dir is not None:
            for other in await asyncio.to_thread(_read_states, self._state_dir):
                for repo, tags in other.items():
                    for tag, when in tags.items():
                        merged.setdefault(repo, {})[tag] = max(
                            when, merged.get(repo, {}).get(tag, 0)
                        )
        for repo, tags in self._pulled.items():
            for tag, when in tags.items():
                merged.setdefault(repo, {})[tag] = max(when, merged.get(repo, {}).get(tag, 0))
        return merged

    async def evict_once(self) -> int:
        """Remove the cached tags the upstreams' eviction rules no longer keep, and the
        manifests that leaves untagged; the garbage collector then frees their blobs."""
        pulled = await self._pull_times()
        now = time.time()
        removed = 0
        last: str | None = None
        while repos := await self.index.list_repositories(_PAGE, last):
            last = repos[-1]
            for repo in repos:
                target = self.target(repo)
                if target is None:
                    continue
                settings = self.settings[target.mirror.name]
                if not settings.keep_last and not settings.max_idle_seconds:
                    continue
                removed += await self._evict(repo, target, settings, pulled.get(repo, {}), now)
        if removed:
            log.info("cache eviction removed %d tags", removed)
        return removed

    async def _evict(
        self, repo: str, target: Target, settings: Settings, pulled: dict[str, float], now: float
    ) -> int:
        live = [s for s in await self.index.tag_states(repo) if s.digest is not None]
        # A tag with no recorded pull (cached before this process started) counts as
        # pulled now: nothing is evicted for want of a record.
        seen = self._pulled.setdefault(repo, {})
        times = []
        for state in live:
            when = pulled.get(state.name) or seen.setdefault(state.name, now)
            # Pulled by its digest (a pinned image) counts as pulled by the tag.
            when = max(when, pulled.get(_BY_DIGEST + (state.digest or ""), 0.0))
            times.append((state.name, when))
        # Manifests pulled by digest that no tag points at go once long unpulled (if no
        # other index holds them), and their pull times with them.
        # (Every worker's pull times, ``pulled``: nodes may be any worker's clients.)
        tagged = {_BY_DIGEST + (state.digest or "") for state in live}
        forget_after = max(settings.max_idle_seconds, _DIGEST_MEMORY)
        for key in [k for k in {**pulled, **seen} if k.startswith(_BY_DIGEST)]:
            last = max(pulled.get(key, 0.0), seen.get(key, 0.0))
            if key not in tagged and now - last > forget_after:
                seen.pop(key, None)
                await self.index.delete_untagged_manifest(repo, key[len(_BY_DIGEST) :])
        gone = set(upstreams.evicted(times, now, settings.keep_last, settings.max_idle_seconds))
        removed = 0
        untagged = []
        for state in live:
            if state.name in gone and await self.index.expire_tag(repo, state.name, state.version):
                removed += 1
                untagged.append(state.digest or "")
                seen.pop(state.name, None)
                self._checked.pop((repo, state.name), None)
        for digest in dict.fromkeys(untagged):
            await self.index.delete_untagged_manifest(repo, digest)  # a cache has no record
        EVICTED.labels(target.mirror.name).inc(removed)
        return removed

    async def close(self) -> None:
        # A fill whose clients were served goes on to make the blob durable and index
        # it, with no request waiting for it: let fills end (a bounded while) before the
        # upstreams and, after this, the index close under them.
        fills = [f.task for f in self._blob_flights.values() if f.task is not None]
        fills += self._manifest_flights.values()
        if fills:
            _, unfinished = await asyncio.wait(fills, timeout=_CLOSE_PATIENCE)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for fetcher in self.fetchers.values():
            await fetcher.close()
        await self.locks.close()
        if self._state_dir is not None and self._pulled:
            path = self._state_dir / f"pulled-{self._worker}.json"
            await asyncio.to_thread(_write_atomic, path, json.dumps(self._pulled))


# Pull times of manifests pulled by digest are kept beside the tags', under "@<digest>"
# (no tag starts with "@").
_BY_DIGEST = "@"
# At least this long since its last pull by digest, a manifest no tag points at goes.
_DIGEST_MEMORY = 86400.0

# How long closing waits for fills under way (the graceful shutdown's bound on requests).
_CLOSE_PATIENCE = 10.0

# How long a follower waits for the next chunk before it looks at the file anyway.
_FOLLOW_POLL = 0.05


async def _progress(flight: _Flight) -> None:
    """Until the fetch has another chunk, is verified or has ended (or a short while)."""
    waits = [
        asyncio.ensure_future(flight.progress.wait()),
        asyncio.ensure_future(flight.released.wait()),
    ]
    assert flight.task is not None
    try:
        await asyncio.wait(
            [*waits, flight.task], timeout=_FOLLOW_POLL, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for wait in waits:
            wait.cancel()


async def _open_to_read(path: Path) -> int:
    """Open ``path`` read-only in a storage thread; when the caller is cancelled meanwhile
    (a client gone, shutdown), the descriptor the thread opens is closed."""
    return await blocking.files.call_owned(os.close, os.open, path, os.O_RDONLY)


async def _write(flight: _Flight, sink: Sink, chunk: bytes) -> None:
    """One write to the leading client; one stalled for ``_SINK_TIMEOUT`` drops it (the
    caller cuts its connection)."""
    try:
        async with asyncio.timeout(_SINK_TIMEOUT):
            await sink.write(chunk)
    except Exception:  # the client is gone or stalled: the fetch goes on without it
        flight.sink = None


async def _send_file(flight: _Flight, sink: Sink, fd: int, sent: int, size: int) -> None:
    """Send the fetch's file from ``sent``: all but its last byte as written, the rest
    once the fetch has verified the digest and the file holds it (not after the fsync
    and the publish, nor failed by them). A fetch that failed before it verified the
    bytes, or whose file misses some (its write-out failed), raises."""
    task = flight.task
    assert task is not None
    while sent < size:
        verified = flight.released.is_set() or (
            task.done() and not task.cancelled() and task.exception() is None
        )
        ready = min(os.fstat(fd).st_size, size if verified else size - 1)
        if ready > sent:
            await sink.send_file(fd, sent, ready - sent)
            sent = ready
        elif task.done():
            await asyncio.shield(task)  # a failure raises; a stored blob is all there
            raise OSError(errno.EIO, "the fetched blob's file ends before its size")
        elif verified:  # its last writes are on their way to the file
            await asyncio.wait((task,), timeout=_FOLLOW_POLL)
        else:
            await _progress(flight)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_states(directory: Path) -> list[dict[str, dict[str, float]]]:
    states = []
    for path in directory.glob("pulled-*.json"):
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                states.append(loaded)
    return states
