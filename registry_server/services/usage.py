"""What each repository stores, against its quota: the admin endpoint's pages and the
Prometheus gauges (the figures are kept by the index: ``storage/index_usage.py``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry_server.protocol import errors
from registry_server.protocol.quotas import NO_QUOTA, Quota, Usage
from registry_server.services.paging import visible_page
from registry_server.storage.index import MetadataIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    usage: Usage
    quota: Quota

    def as_json(self) -> dict[str, object]:
        u, q = self.usage, self.quota
        return {
            "repository": u.repository,
            "storage": u.storage,
            "tags": u.tags,
            "manifests": u.manifests,
            "quota": {"storage": q.storage, "tags": q.tags},
        }


class UsageService:
    def __init__(self, index: MetadataIndex, quota: Callable[[str], Quota] | None = None) -> None:
        self.index = index
        self.quota = quota or (lambda _repo: NO_QUOTA)

    async def one(self, repo: str) -> Entry:
        usage = await self.index.usage(repo)
        if usage is None:
            raise errors.RegistryError(errors.NAME_UNKNOWN, detail={"name": repo})
        return Entry(usage, self.quota(repo))

    async def page(
        self, n: int | None, last: str | None, visible: Callable[[str], Awaitable[bool]]
    ) -> tuple[list[Entry], str | None]:
        """The repositories the caller may pull, in name order after ``last``, and the
        name to continue after (None at the end); filtered before paging, as the catalog."""
        found, ended = await visible_page(
            self.index.usages, lambda u: u.repository, n, last, visible
        )
        out = [Entry(usage, self.quota(usage.repository)) for usage in found]
        return out, (None if ended or not found else found[-1].repository)


class UsageGauges(Collector):
    """Per-repository gauges from the latest snapshot (refreshed in the background, so a
    scrape never waits on the index). One per process, registered once."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def collect(self) -> Iterator[Metric]:
        stored = GaugeMetricFamily(
            "berth_repository_stored_bytes",
            "Bytes a repository's manifests hold (each blob once per repository)",
            labels=["repository"],
        )
        tags = GaugeMetricFamily(
            "berth_repository_tags", "Tags per repository", labels=["repository"]
        )
        manifests = GaugeMetricFamily(
            "berth_repository_manifests", "Manifests per repository", labels=["repository"]
        )
        quota_bytes = GaugeMetricFamily(
            "berth_repository_quota_bytes", "A repository's storage quota", labels=["repository"]
        )
        quota_tags = GaugeMetricFamily(
            "berth_repository_quota_tags", "A repository's tag quota", labels=["repository"]
        )
        for entry in self.entries:
            name = [entry.usage.repository]
            stored.add_metric(name, entry.usage.storage)
            tags.add_metric(name, entry.usage.tags)
            manifests.add_metric(name, entry.usage.manifests)
            if entry.quota.storage is not None:
                quota_bytes.add_metric(name, entry.quota.storage)
            if entry.quota.tags is not None:
                quota_tags.add_metric(name, entry.quota.tags)
        yield from (stored, tags, manifests, quota_bytes, quota_tags)


GAUGES = UsageGauges()
REGISTRY.register(GAUGES)


async def refresh_forever(service: UsageService, interval: float) -> None:
    """Keep ``GAUGES`` current (worker 0 of each replica; every replica reads the same
    index, so they report the same figures)."""
    while True:
        try:
            GAUGES.entries = [
                Entry(u, service.quota(u.repository))
                for u in await service.index.usages(None, None)
            ]
        except Exception:  # the next round tries again; the gauges keep the last figures
            log.exception("usage gauges not refreshed")
        await asyncio.sleep(interval)
