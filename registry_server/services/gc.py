"""Online garbage collection and stale-upload purging.

Safe while pushes run: a blob is collected only when no manifest references it and no
push has linked it for the grace period (the layers of a deleted image go; those of a
push whose manifest is still to come stay). The row and links are removed and the file
deleted under the index's write lock, the same lock under which an upload publishes its
file and links it, and under which a manifest push checks its blobs are still there.
There is no stop-the-world phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

from registry_server.protocol import digests
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.index import MetadataIndex

log = logging.getLogger("registry_server.gc")

COLLECTED = Counter("berth_gc_blobs_deleted_total", "Blobs deleted by garbage collection")
FREED = Counter("berth_gc_bytes_freed_total", "Bytes freed by garbage collection")
PURGED = Counter("berth_gc_uploads_purged_total", "Stale upload sessions removed")
# Per process: with several replicas, only the one elected for "gc" runs rounds.
ROUNDS = Counter("berth_gc_rounds_total", "Garbage collection rounds started")


async def scheduled_rounds(
    pressure: Callable[[float], Awaitable[bool]],
    interval: float,
    prompt: Callable[[], Awaitable[object]],
    whole: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``whole`` (eviction, retention, a collection round with the purge of stale
    uploads and the orphan sweep) every ``interval`` seconds, and ``prompt`` (collect
    what deletes released) whenever ``pressure`` (the full-volume gate's wait) returns
    early. The whole round keeps its interval on a full volume: what it frees may be
    what lets the volume take writes again (it never ran while the volume stayed full)."""
    due = clock() + interval
    while True:
        if await pressure(max(0.0, due - clock())):
            await prompt()
            if clock() < due:
                continue
        await whole()
        due = clock() + interval  # from its end: a round longer than that is not followed at once


@dataclass(frozen=True)
class GcReport:
    blobs_deleted: int
    bytes_freed: int
    uploads_purged: int
    orphans_deleted: int = 0  # files a crash left unrecorded
    finished: float = 0.0  # when the round ended (seconds since the epoch)


# The last round this process ran (the web UI's status page; the elected worker's).
last_round: GcReport | None = None


class GarbageCollector:
    def __init__(
        self,
        store: BlobStore,
        index: MetadataIndex,
        grace_seconds: float,
        upload_ttl_seconds: float,
    ) -> None:
        self.store = store
        self.index = index
        self.grace_seconds = grace_seconds
        self.upload_ttl_seconds = upload_ttl_seconds

    async def run_once(self, sweep: bool = True) -> GcReport:
        """One round. Without ``sweep`` (the prompt rounds while the volume is full) only
        what the index says is unreferenced is collected: no walk of the whole tree."""
        if await self.store.backup_running():  # no blob the backup's snapshot names may go
            log.info("garbage collection skipped: a backup is running")
            return GcReport(0, 0, 0)
        ROUNDS.inc()
        now = time.time()
        await self.recover_trash()
        deleted = freed = 0
        cutoff = now - self.grace_seconds
        for text in await self.index.unreferenced_blobs(cutoff):
            digest = digests.parse(text)
            size = await self.store.size(digest) or 0
            trashed: list[str] = []

            async def remove(d: digests.Digest = digest, into: list[str] = trashed) -> None:
                if (name := await self.store.discard(d)) is not None:
                    into.append(name)

            if await self.index.forget_blob(text, cutoff, remove):
                deleted += 1
                freed += size
            for name in trashed:  # forgotten for good (committed): now the bytes can go
                await self.store.empty_trash(name)
        orphans = purged = 0
        if not sweep:
            return self._report(deleted, freed, purged, orphans)
        stored = [str(d) for d in await self.store.stored()]
        recorded = await self.index.recorded_blobs(stored)
        for text in stored:
            if text in recorded:
                continue
            digest = digests.parse(text)
            orphan_size = await self.store.size(digest)
            if orphan_size is None:
                # A name without bytes: an object store's empty folder left where a blob
                # was deleted (SeaweedFS lists them). Nothing to free, not an orphan.
                continue

            async def remove_file(d: digests.Digest = digest) -> None:
                await self.store.delete(d)

            if await self.index.forget_unrecorded(text, remove_file):
                orphans += 1
                freed += orphan_size
        for upload_id in await self.store.stale_uploads(now - self.upload_ttl_seconds):
            await self.store.cancel(upload_id)
            purged += 1
        return self._report(deleted, freed, purged, orphans)

    @staticmethod
    def _report(deleted: int, freed: int, purged: int, orphans: int) -> GcReport:
        COLLECTED.inc(deleted + orphans)
        FREED.inc(freed)
        PURGED.inc(purged)
        global last_round
        report = last_round = GcReport(deleted, freed, purged, orphans, time.time())
        if deleted or purged or orphans:
            log.info(
                "garbage collected",
                extra={"blobs": deleted, "bytes": freed, "uploads": purged, "orphans": orphans},
            )
        return report

    async def recover_trash(self) -> None:
        """Blobs trashed by a round that did not commit (a crash, a failed commit): back
        into place if the index still records them, else gone. Every round starts with
        it, and the elected process runs it at start (pulls of those blobs fail until)."""
        entries = await self.store.trash()
        if not entries:
            return
        recorded = await self.index.recorded_blobs([str(d) for _, d in entries])
        for name, digest in entries:
            if str(digest) in recorded:

                async def put_back(n: str = name, d: digests.Digest = digest) -> None:
                    if not await self.store.restore(n, d):
                        await self.store.empty_trash(n)

                await self.index.locked(put_back)
                log.warning("blob restored from the trash", extra={"digest": str(digest)})
            else:
                await self.store.empty_trash(name)
