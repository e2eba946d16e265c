"""What the web UI shows: repositories, a repository's tags, a manifest with its
platforms and referrers. Reads only (deletes go through the manifest service); every
list is a page of the index, so a page costs the same at 10,000 repositories or tags.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from registry_server.protocol import errors, manifests
from registry_server.protocol.quotas import NO_QUOTA, Quota, Usage
from registry_server.protocol.tag_rules import NO_RULES, TagRules
from registry_server.services.paging import visible_page
from registry_server.storage.index import ManifestRecord, MetadataIndex

# Referrers are followed this deep (a signature of an SBOM of an image is 2).
REFERRER_DEPTH = 3


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Platform:
    name: str  # os/architecture[/variant], or "unknown"
    digest: str
    size: int


@dataclass(frozen=True)
class Description:
    """What a manifest's bytes say, for people."""

    media_type: str
    kind: str  # "image", "index" or "artifact"
    size: int | None  # config and layers of an image; None for an index
    config: Layer | None
    layers: tuple[Layer, ...]
    platforms: tuple[Platform, ...]
    annotations: dict[str, str]
    artifact_type: str | None
    subject: str | None


def _platform(entry: dict[str, Any]) -> str:
    platform = entry.get("platform")
    if not isinstance(platform, dict):
        return "index" if entry.get("mediaType") in manifests.INDEX_TYPES else "unknown"
    parts = [str(platform.get("os", "?")), str(platform.get("architecture", "?"))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _layer(entry: Any) -> Layer | None:
    if not isinstance(entry, dict):
        return None
    try:
        return Layer(str(entry["digest"]), str(entry.get("mediaType", "")), int(entry["size"]))
    except (KeyError, TypeError, ValueError):
        return None


def describe(content: bytes, media_type: str) -> Description:
    """A stored manifest's parts (it was validated when pushed; what is odd is skipped)."""
    try:
        doc = json.loads(content)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
    subject = doc.get("subject") if isinstance(doc.get("subject"), dict) else None
    if media_type in manifests.INDEX_TYPES:
        entries = [e for e in doc.get("manifests") or [] if isinstance(e, dict)]
        platforms = tuple(
            Platform(_platform(e), str(e.get("digest", "")), int(e.get("size", 0) or 0))
            for e in entries
        )
        return Description(
            media_type, "index", None, None, (), platforms, dict(annotations or {}),
            doc.get("artifactType"), str(subject["digest"]) if subject else None,
        )  # fmt: skip
    config = _layer(doc.get("config"))
    layers = tuple(x for x in map(_layer, doc.get("layers") or []) if x is not None)
    artifact = doc.get("artifactType") or (
        config.media_type if config and config.media_type not in _IMAGE_CONFIGS else None
    )
    size = (config.size if config else 0) + sum(x.size for x in layers)
    return Description(
        media_type, "artifact" if artifact else "image", size, config, layers, (),
        dict(annotations or {}), artifact, str(subject["digest"]) if subject else None,
    )  # fmt: skip


_IMAGE_CONFIGS = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)


@dataclass(frozen=True)
class RepositoryRow:
    usage: Usage
    quota: Quota
    last_push: float | None


@dataclass(frozen=True)
class TagRow:
    name: str
    digest: str
    pushed: float
    description: Description | None  # None: the manifest is gone (a race with a delete)
    immutable: bool
    retained: bool  # protected from retention


@dataclass(frozen=True)
class Referrer:
    record: ManifestRecord
    children: tuple[Referrer, ...]


@dataclass(frozen=True)
class ManifestPage:
    repository: str
    record: ManifestRecord
    description: Description
    tags: tuple[str, ...]
    referrers: tuple[Referrer, ...]


@dataclass
class _Descriptions:
    """Recently described manifests by digest: a tag page describes a hundred."""

    size: int = 4096
    kept: OrderedDict[str, Description] = field(default_factory=OrderedDict)

    def get(self, digest: str, load: Callable[[], Description]) -> Description:
        found = self.kept.get(digest)
        if found is None:
            found = self.kept[digest] = load()
            if len(self.kept) > self.size:
                self.kept.popitem(last=False)
        else:
            self.kept.move_to_end(digest)
        return found


class BrowseService:
    def __init__(
        self,
        index: MetadataIndex,
        tag_rules: Callable[[str], TagRules] | None = None,
        quota: Callable[[str], Quota] | None = None,
    ) -> None:
        self.index = index
        self.tag_rules = tag_rules or (lambda _repo: NO_RULES)
        self.quota = quota or (lambda _repo: NO_QUOTA)
        self._descriptions = _Descriptions()

    async def repositories(
        self,
        n: int,
        last: str | None,
        contains: str,
        visible: Callable[[str], Awaitable[bool]],
    ) -> tuple[list[RepositoryRow], str | None]:
        """A page of the repositories the caller may pull; the name after which the next
        page starts (None: this is the last)."""

        async def fetch(limit: int, after: str | None) -> list[tuple[Usage, float | None]]:
            return await self.index.repository_listing(limit, after, contains)

        found, ended = await visible_page(fetch, lambda row: row[0].repository, n, last, visible)
        out = [RepositoryRow(u, self.quota(u.repository), pushed) for u, pushed in found]
        return out, (None if ended or not out else out[-1].usage.repository)

    async def usage(self, repo: str) -> RepositoryRow:
        usage = await self.index.usage(repo)
        if usage is None:
            raise errors.RegistryError(errors.NAME_UNKNOWN, detail={"name": repo})
        return RepositoryRow(usage, self.quota(repo), None)

    async def _description(self, repo: str, digest: str) -> Description | None:
        record = await self.index.get_manifest(repo, digest)
        if record is None or record.content is None:
            return None
        content, media_type = record.content, record.media_type
        return self._descriptions.get(digest, lambda: describe(content, media_type))

    async def tags(self, repo: str, n: int, last: str | None) -> tuple[list[TagRow], str | None]:
        details = await self.index.tag_details(repo, n, last)
        if details is None:
            raise errors.RegistryError(errors.NAME_UNKNOWN, detail={"name": repo})
        rules = self.tag_rules(repo)
        protect = rules.retention.protect if rules.retention is not None else ()
        out = []
        for tag in details:
            out.append(
                TagRow(
                    tag.name,
                    tag.digest,
                    tag.updated,
                    await self._description(repo, tag.digest),
                    rules.is_immutable(tag.name),
                    bool(protect) and TagRules(immutable=protect).is_immutable(tag.name),
                )
            )
        more = len(details) == n and n > 0
        return out, (details[-1].name if more else None)

    async def manifest(self, repo: str, digest: str) -> ManifestPage:
        record = await self.index.get_manifest(repo, digest)
        if record is None or record.content is None:
            raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"digest": digest})
        description = describe(record.content, record.media_type)
        states = await self.index.tag_states(repo) if await self._few_tags(repo) else []
        tags = tuple(sorted(t.name for t in states if t.digest == digest))
        return ManifestPage(
            repo, record, description, tags, await self._referrers(repo, digest, REFERRER_DEPTH)
        )

    async def _few_tags(self, repo: str) -> bool:
        # Which tags point here needs every tag's state: skipped for huge repositories.
        usage = await self.index.usage(repo)
        return usage is not None and usage.tags <= 2000

    async def _referrers(self, repo: str, subject: str, depth: int) -> tuple[Referrer, ...]:
        if depth == 0:
            return ()
        found = await self.index.referrers(repo, subject)
        out = []
        for record in found[:200]:
            out.append(Referrer(record, await self._referrers(repo, record.digest, depth - 1)))
        return tuple(out)
