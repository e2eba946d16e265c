"""The ``MetadataIndex`` once for every SQL engine: each method is a shared transaction
(``index_tags``, ``index_blobs``, ``changelog``) handed to the backend's runner.

A backend provides the runners: ``_read`` (one read, no transaction needed) and
``_write`` (a transaction, retried or batched as the engine likes, with storage actions
``before``/``after`` run under the write lock for ``blob``, or under the lock of all
blobs when ``blob`` is None; ``frees`` marks the writes that free space), plus
``_number`` where the change log needs numbering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from registry_server.protocol.quotas import Quota, Usage
from registry_server.protocol.versions import Stamp
from registry_server.storage import (
    auth_failures,
    changelog,
    ended_sessions,
    index_blobs,
    index_tags,
    index_usage,
)
from registry_server.storage.index import (
    Change,
    ManifestRecord,
    NewManifest,
    ReferrerState,
    TagDetail,
    TagState,
)
from registry_server.storage.sqltx import Dialect, Query, Tx

T = TypeVar("T")


def _nothing() -> Tx[None]:
    return None
    yield Query("")  # a generator that runs no statement


class SqlIndex(ABC):
    instance_id: str
    dialect: Dialect

    def __init__(self, region: str, consumers: Sequence[str]) -> None:
        self.region = region
        # The change log's consumers: replication peers and webhook endpoints.
        self.peers = tuple(consumers)

    @abstractmethod
    async def _read(self, tx: Tx[T]) -> T: ...

    @abstractmethod
    async def _write(
        self,
        tx: Callable[[], Tx[T]],
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[T], Awaitable[None]] | None = None,
        blob: str | None = None,
        frees: bool = False,
    ) -> T:
        """Run the transaction ``tx()`` makes (perhaps more than once); returns when
        committed. ``frees``: a delete or a collection, which may spend the space reserve
        to commit on a full volume (``storage.space``)."""

    async def _number(self) -> None:  # noqa: B027 - optional: SQLite needs none
        """Number committed change-log entries (engines whose log needs it)."""

    async def open(self) -> None:  # noqa: B027 - optional: SQLite opens at once
        """Ready for use (connections that need a running event loop)."""

    # -- manifests and tags --------------------------------------------------------------

    async def put_manifest(
        self,
        repo: str,
        manifest: NewManifest,
        tags: Sequence[str],
        stamp: Stamp | None = None,
        immutable: Collection[str] = (),
        required_blobs: Sequence[str] = (),
        required_manifests: Sequence[str] = (),
        actor: str | None = None,
        quota: Quota | None = None,
        replicated: bool = False,
        stored_version: int | None = None,
    ) -> list[str]:
        return await self._write(
            lambda: index_tags.put_manifest(
                self.dialect,
                self.region,
                self.peers,
                repo,
                manifest,
                tags,
                stamp,
                immutable,
                required_blobs,
                required_manifests,
                actor,
                quota,
                replicated,
                stored_version,
            )
        )

    async def get_manifest(
        self, repo: str, digest: str, content: bool = True
    ) -> ManifestRecord | None:
        return await self._read(index_tags.get_manifest(repo, digest, content))

    async def resolve_tag(self, repo: str, tag: str) -> str | None:
        return await self._read(index_tags.resolve_tag(repo, tag))

    async def delete_manifest(
        self,
        repo: str,
        digest: str,
        stamp: Stamp | None = None,
        actor: str | None = None,
        immutable: Callable[[str], bool] | None = None,
        release: bool = False,
        tombstoned: list[str] | None = None,
    ) -> bool:
        return await self._write(
            lambda: index_tags.delete_manifest(
                self.dialect,
                self.region,
                self.peers,
                repo,
                digest,
                stamp,
                actor,
                immutable,
                release,
                tombstoned,
            ),
            frees=True,
        )

    async def delete_tag(
        self,
        repo: str,
        tag: str,
        stamp: Stamp | None = None,
        actor: str | None = None,
        immutable: bool = False,
    ) -> bool:
        return await self._write(
            lambda: index_tags.delete_tag(
                self.dialect, self.region, self.peers, repo, tag, stamp, actor, immutable
            ),
            frees=True,
        )

    async def expire_tag(self, repo: str, tag: str, version: int) -> bool:
        return await self._write(
            lambda: index_tags.expire_tag(self.dialect, self.peers, repo, tag, version),
            frees=True,
        )

    async def delete_untagged_manifest(
        self, repo: str, digest: str, held_since: float | None = None
    ) -> list[str]:
        return await self._write(
            lambda: index_tags.delete_untagged_manifest(
                self.dialect, self.region, self.peers, repo, digest, held_since
            ),
            frees=True,
        )

    async def untagged_manifests(self, repo: str, older_than: float) -> list[str]:
        return await self._read(index_tags.untagged_manifests(repo, older_than))

    async def list_tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        return await self._read(index_tags.list_tags(self.dialect, repo, n, last))

    async def tag_list_version(self, repo: str) -> tuple[int, int] | None:
        return await self._read(index_tags.tag_list_version(repo))

    async def list_repositories(self, n: int | None, last: str | None) -> list[str]:
        return await self._read(index_tags.list_repositories(self.dialect, n, last))

    async def referrers(self, repo: str, subject: str) -> list[ManifestRecord]:
        return await self._read(index_tags.referrers(repo, subject))

    async def usage(self, repo: str) -> Usage | None:
        return await self._read(index_usage.usage(repo))

    async def usages(self, n: int | None, last: str | None) -> list[Usage]:
        return await self._read(index_usage.usages(self.dialect, n, last))

    async def recount_usage(self, repo: str) -> Usage | None:
        return await self._read(index_usage.recount(repo))

    async def repository_listing(
        self, n: int | None, last: str | None, contains: str = ""
    ) -> list[tuple[Usage, float | None]]:
        return await self._read(index_usage.listing(self.dialect, n, last, contains))

    async def tag_details(
        self, repo: str, n: int | None, last: str | None
    ) -> list[TagDetail] | None:
        return await self._read(index_tags.tag_details(self.dialect, repo, n, last))

    async def missing_manifests(self, repo: str, digests: Sequence[str]) -> list[str]:
        return await self._read(index_tags.missing("manifests", repo, digests))

    # -- blobs ---------------------------------------------------------------------------

    async def link_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        await self._write(
            lambda: index_blobs.link(self.dialect, repo, digest, size), before=publish, blob=digest
        )

    async def blob_size(self, repo: str, digest: str) -> int | None:
        return await self._read(index_blobs.size(repo, digest))

    async def unlink_blob(self, repo: str, digest: str) -> bool:
        return await self._write(lambda: index_blobs.unlink(repo, digest), frees=True)

    async def missing_blobs(self, repo: str, digests: Sequence[str]) -> list[str]:
        return await self._read(index_tags.missing("blob_links", repo, digests))

    async def repositories_with_blob(self, digest: str) -> list[str]:
        return await self._read(index_blobs.repositories_with(digest))

    # -- garbage collection --------------------------------------------------------------

    async def unreferenced_blobs(self, older_than: float) -> list[str]:
        return await self._read(index_blobs.unreferenced(older_than))

    async def forget_blob(
        self, digest: str, older_than: float, remove: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        async def after(forgotten: bool) -> None:
            if forgotten and remove is not None:
                await remove()

        return await self._write(
            lambda: index_blobs.forget(self.dialect, digest, older_than),
            after=after,
            blob=digest,
            frees=True,
        )

    async def locked(self, action: Callable[[], Awaitable[None]]) -> None:
        await self._write(_nothing, before=action, frees=True)

    async def recorded_blobs(self, digests: Sequence[str]) -> set[str]:
        return await self._read(index_blobs.recorded(digests))

    async def forget_unrecorded(self, digest: str, remove: Callable[[], Awaitable[None]]) -> bool:
        async def after(unrecorded: bool) -> None:
            if unrecorded:
                await remove()

        return await self._write(
            lambda: index_blobs.unrecorded(digest), after=after, blob=digest, frees=True
        )

    # -- replication ---------------------------------------------------------------------

    async def pending_changes(self, peer: str, limit: int) -> list[Change]:
        await self._number()
        return await self._read(changelog.pending(peer, limit))

    async def ack_change(self, peer: str, seq: int) -> None:
        await self._write(lambda: changelog.ack(self.peers, peer, seq), frees=True)

    async def queue_stats(self, peer: str) -> tuple[int, float | None]:
        return await self._read(changelog.stats(peer))

    async def repository_hash(self, repo: str) -> str | None:
        return await self._read(index_tags.repository_hash(repo))

    async def tag_states(self, repo: str) -> list[TagState]:
        return await self._read(index_tags.tag_states(repo))

    async def tag_stamps(self, repo: str, names: Sequence[str]) -> list[TagState]:
        return await self._read(index_tags.tag_stamps(repo, names))

    async def referrer_digests(self, repo: str) -> list[str]:
        return await self._read(index_tags.referrer_digests(repo))

    async def referrer_states(self, repo: str) -> list[ReferrerState]:
        return await self._read(index_tags.referrer_states(repo))

    async def add_auth_failures(
        self, entries: Sequence[tuple[str, bytes, float]], now: float
    ) -> None:
        await self._write(lambda: auth_failures.add(entries, now))

    async def draining_auth_failures(self, now: float) -> list[tuple[str, bytes, float]]:
        return await self._read(auth_failures.draining(now))

    async def end_session(self, token_id: str, expires_at: float) -> None:
        await self._write(lambda: ended_sessions.end(self.dialect, token_id, expires_at))

    async def ended_sessions(self, since: float | None) -> tuple[list[tuple[str, float]], float]:
        return await self._read(ended_sessions.ended_since(self.dialect, since))

    async def expire_tombstones(self, older_than: float) -> int:
        return await self._write(lambda: index_tags.expire_tombstones(older_than), frees=True)
