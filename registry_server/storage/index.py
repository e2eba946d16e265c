"""The metadata index interface: repositories, tags, manifests, references, referrers.

Tag listing, catalog and referrers are indexed queries, not directory walks. SQLite is
the embedded backend (its reads are sub-millisecond indexed lookups done inline; writes
go through one writer thread); a PostgreSQL backend implements the same protocol for registries
served by many stateless replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ManifestRecord:
    digest: str
    media_type: str
    size: int
    content: bytes | None  # None when only metadata was asked for
    artifact_type: str | None
    subject: str | None
    annotations: str | None  # JSON text, as stored


@dataclass(frozen=True)
class NewManifest:
    digest: str
    media_type: str
    content: bytes
    artifact_type: str | None
    subject: str | None
    annotations: str | None
    blob_refs: Sequence[str]
    child_refs: Sequence[str]


class MetadataIndex(Protocol):
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the index cannot be read (readiness)."""

    # manifests and tags
    async def put_manifest(self, repo: str, manifest: NewManifest, tags: Sequence[str]) -> None: ...
    async def get_manifest(
        self, repo: str, digest: str, content: bool = True
    ) -> ManifestRecord | None: ...
    async def resolve_tag(self, repo: str, tag: str) -> str | None: ...
    async def delete_manifest(self, repo: str, digest: str) -> bool: ...
    async def delete_tag(self, repo: str, tag: str) -> bool: ...
    async def list_tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        """Tags in lexical order after ``last``; None when the repository is unknown."""

    async def list_repositories(self, n: int | None, last: str | None) -> list[str]: ...
    async def referrers(self, repo: str, subject: str) -> list[ManifestRecord]: ...
    async def missing_manifests(self, repo: str, digests: Sequence[str]) -> list[str]: ...

    # blobs linked into repositories
    async def link_blob(self, repo: str, digest: str, size: int) -> None: ...
    async def blob_size(self, repo: str, digest: str) -> int | None: ...
    async def unlink_blob(self, repo: str, digest: str) -> bool: ...
    async def missing_blobs(self, repo: str, digests: Sequence[str]) -> list[str]: ...
    async def repositories_with_blob(self, digest: str) -> list[str]: ...

    # garbage collection
    async def unreferenced_blobs(self, older_than: float) -> list[str]: ...
    async def forget_blob(self, digest: str) -> bool:
        """Remove a blob's global record if still unreferenced; True when removed."""
