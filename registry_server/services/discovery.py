"""Tag listing, catalog and the referrers API."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from registry_server.protocol import digests, errors, manifests
from registry_server.services.paging import visible_page
from registry_server.services.tag_lists import TagListCache
from registry_server.storage.index import MetadataIndex


@dataclass(frozen=True)
class Page:
    items: list[str]
    next_last: str | None  # set when a further page may exist
    body: bytes | None = None  # the response body, when it is kept serialised


@dataclass(frozen=True)
class Referrers:
    body: bytes
    filtered: bool


class DiscoveryService:
    def __init__(self, index: MetadataIndex) -> None:
        self.index = index
        self.tag_lists = TagListCache()

    async def tags(self, repo: str, n: int | None, last: str | None) -> Page:
        unknown = errors.RegistryError(errors.NAME_UNKNOWN, detail={"name": repo})
        # The version first, then the names: a change in between leaves newer names
        # kept under an older version, which the next request finds stale.
        version = await self.index.tag_list_version(repo)
        if version is None:
            raise unknown
        kept = self.tag_lists.get(repo, version)
        if kept is None:
            names = await self.index.list_tags(repo, None, None)
            if names is None:
                raise unknown
            kept = self.tag_lists.put(repo, version, names)
        if n is None and last is None:
            return Page(kept.names, None, kept.body(repo))
        found = kept.page(n, last)
        # No Link after the last tag: it would lead to an empty page.
        more = n is not None and n > 0 and len(found) == n and found[-1] != kept.names[-1]
        return Page(found, found[-1] if more else None)

    async def catalog(
        self, n: int | None, last: str | None, visible: Callable[[str], Awaitable[bool]]
    ) -> Page:
        """Repositories the caller may see, paginated after filtering."""
        out, ended = await visible_page(self.index.list_repositories, str, n, last, visible)
        more = n is not None and n > 0 and len(out) == n and not ended
        return Page(out, out[-1] if more else None)

    async def referrers(
        self, repo: str, subject: digests.Digest, artifact_type: str | None
    ) -> Referrers:
        records = await self.index.referrers(repo, str(subject))
        entries: list[dict[str, Any]] = []
        for rec in records:
            if artifact_type and rec.artifact_type != artifact_type:
                continue
            entry: dict[str, Any] = {
                "mediaType": rec.media_type,
                "digest": rec.digest,
                "size": rec.size,
            }
            if rec.artifact_type:
                entry["artifactType"] = rec.artifact_type
            if rec.annotations:
                entry["annotations"] = json.loads(rec.annotations)
            entries.append(entry)
        body = {"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": entries}
        return Referrers(json.dumps(body).encode(), bool(artifact_type))
