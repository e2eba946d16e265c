"""Retention: remove the tags a repository's rules no longer keep, then their manifests.

Runs on the garbage collector's schedule, before it; the collector then frees the blobs
of removed images once the grace period is over. Removals are local decisions, never
replicated: every region applies its own rules to the same replicated tag versions (so
with the same rules they choose the same tags), and a removal sent to a peer could also
delete what was pushed there in the meantime. They are logged for notifications.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from registry_server.protocol.tag_rules import TagRules
from registry_server.storage.index import MetadataIndex, TagState
from registry_server.storage.records import TagRecord

log = logging.getLogger("registry_server.retention")

EXPIRED = Counter("berth_retention_tags_removed_total", "Tags removed by retention rules")
DELETED = Counter(
    "berth_retention_manifests_deleted_total",
    "Manifests deleted by retention (untagged by it, or held by nothing for untagged_days)",
)

_PAGE = 500


@dataclass(frozen=True)
class RetentionReport:
    tags_removed: int
    manifests_deleted: int


class RetentionService:
    def __init__(
        self,
        index: MetadataIndex,
        tag_rules: Callable[[str], TagRules],
        on_change: Callable[[], None] | None = None,
        record: TagRecord | None = None,
        wall: Callable[[], float] = time.time,
        cached: Callable[[str], bool] = lambda repo: False,
    ) -> None:
        self.index = index
        self._wall = wall
        # Repositories the pull-through cache fills: their manifests pulled by digest
        # have no tag and are kept by the cache's own eviction, which knows their pulls.
        self._cached = cached
        self.tag_rules = tag_rules
        self._on_change = on_change or (lambda: None)
        self.record = record  # the tag record the SQLite index is rebuilt from

    async def run_once(self) -> RetentionReport:
        removed = deleted = 0
        last: str | None = None
        while repos := await self.index.list_repositories(_PAGE, last):
            for repo in repos:
                r, d = await self._apply(repo, self.tag_rules(repo))
                removed, deleted = removed + r, deleted + d
            last = repos[-1]
        EXPIRED.inc(removed)
        DELETED.inc(deleted)
        if removed or deleted:
            self._on_change()
            log.info("retention applied", extra={"tags": removed, "manifests": deleted})
        return RetentionReport(removed, deleted)

    async def _apply(self, repo: str, rules: TagRules) -> tuple[int, int]:
        if rules.retention is None:
            return 0, 0
        live = [s for s in await self.index.tag_states(repo) if s.digest is not None]
        expired = set(rules.expired([(s.name, s.version) for s in live]))
        removed: list[TagState] = []
        untagged: list[str] = []
        for state in live:
            # Conditional on the version seen: a tag pushed again meanwhile is kept.
            if state.name in expired and await self.index.expire_tag(
                repo, state.name, state.version
            ):
                removed.append(TagState(state.name, None, state.version, state.origin))
                assert state.digest is not None
                untagged.append(state.digest)
        deleted: list[str] = []
        for digest in dict.fromkeys(untagged):
            # Only if nothing holds it any more (another tag, an index listing it).
            deleted += await self.index.delete_untagged_manifest(repo, digest)
        if rules.retention.untagged_days is not None and not self._cached(repo):
            deleted += await self._untagged(repo, rules.retention.untagged_days)
        if self.record is not None and (removed or deleted):
            await self.record.removed(repo, deleted, removed)
        return len(removed), len(deleted)

    async def _untagged(self, repo: str, days: float) -> list[str]:
        """Delete the manifests nothing has held for ``days`` (and the platforms of such
        an index): an overwritten tag's image, a push by digest never tagged."""
        since = self._wall() - days * 86400
        deleted: list[str] = []
        for digest in await self.index.untagged_manifests(repo, since):
            if digest not in deleted:  # gone with an index deleted before it
                deleted += await self.index.delete_untagged_manifest(repo, digest, since)
        return deleted
