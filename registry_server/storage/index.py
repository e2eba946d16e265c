"""The metadata index interface: repositories, tags, manifests, references, referrers.

Tag listing, catalog and referrers are indexed queries, not directory walks. SQLite is
the embedded backend (its reads are sub-millisecond indexed lookups done inline; writes
go through one writer thread); PostgreSQL (``postgres_index``) serves one database to
many replicas. Both run the same transactions (``sql_index``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from registry_server.protocol.quotas import Quota, Usage
from registry_server.protocol.versions import Stamp


@dataclass(frozen=True)
class ManifestRecord:
    digest: str
    media_type: str
    size: int
    content: bytes | None  # None when only metadata was asked for
    artifact_type: str | None
    subject: str | None
    annotations: str | None  # JSON text, as stored
    # A referrer's clock version when first stored (in the region it was pushed to);
    # set by get_manifest only.
    stored_version: int | None = None


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


@dataclass(frozen=True)
class TagState:
    """A tag's replicated state; ``digest`` is None for a tombstone (a replicated delete)."""

    name: str
    digest: str | None
    version: int
    origin: str


@dataclass(frozen=True)
class ReferrerState:
    """A referrer as anti-entropy compares it: ``stored`` (its clock version when first
    stored) for one held, ``deleted`` (the delete's stamp) for one deleted by digest."""

    digest: str
    stored: int | None
    deleted: Stamp | None


class Overtaken(Exception):
    """A peer sent a referrer by digest that was deleted after its copy was stored
    (or that was deleted, and the peer does not say when its copy was stored)."""


@dataclass(frozen=True)
class TagDetail:
    """A tag as the web UI lists it."""

    name: str
    digest: str
    updated: float  # when it was last pushed here (seconds since the epoch)


@dataclass(frozen=True)
class Change:
    """One entry of the replication log, delivered to every peer in ``seq`` order.

    ``op`` is "tag" (tag -> digest), "manifest" (an untagged manifest such as a referrer),
    "delete_tag" or "delete_manifest"; or one of LOCAL_OPS.
    """

    seq: int
    repo: str
    op: str
    tag: str | None
    digest: str | None
    version: int
    origin: str
    created: float
    actor: str | None = None  # the account that made a local change (for notifications)


# The actor recorded for what retention removes (account names cannot contain ':').
RETENTION_ACTOR = "berth:retention"
# Logged for notifications but never replicated: retention's removals. Each region applies
# its own rules; a removal sent to a peer would also delete what was pushed there since.
LOCAL_OPS = frozenset({"expire_tag", "expire_manifest"})


class MetadataIndex(Protocol):
    # Made once per database: with a change's seq it names the change everywhere (a new
    # database restarts seq, and gets a new id).
    instance_id: str

    async def open(self) -> None:
        """Ready for use: what needs the running event loop (a connection pool)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the index cannot be read (readiness)."""

    # manifests and tags
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
        """Store a manifest and point ``tags`` at it; returns the tags actually moved.
        ``replicated``: a manifest a peer sends by digest (no stamp: it moves no tag), not
        logged again either; ``stored_version`` is a referrer's clock version when first
        stored (the peer sends it): one deleted here (or by a delete replicated here)
        after that raises Overtaken.

        Without ``stamp`` this is a local push: it gets the next clock version and is
        logged for every peer in the same transaction. With a ``stamp`` it is a replicated
        change, applied per tag only where it wins (last writer wins) and not logged again.
        A tag in ``immutable`` that already points elsewhere fails a local push with
        TAG_IMMUTABLE; for a replicated change the earlier of the two pushes stays (every
        region converges on the first). A required blob not linked into ``repo`` (or child
        manifest not in it) fails it with MANIFEST_BLOB_UNKNOWN; all decided in the same
        transaction.
        """

    async def get_manifest(
        self, repo: str, digest: str, content: bool = True
    ) -> ManifestRecord | None: ...
    async def resolve_tag(self, repo: str, tag: str) -> str | None: ...
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
        """Delete a manifest and tombstone its tags (a replicated delete spares newer tags);
        ``tombstoned`` is given the names of the tags the delete's transaction removed.

        With ``immutable`` (a local delete), fails with TAG_IMMUTABLE if a tag it matches
        points at the manifest or at an index listing it, decided in the transaction.
        ``release`` (the volume is full): its blobs linked before it was pushed may be
        collected at once, without the grace period that protects pushes in flight."""

    async def delete_tag(
        self,
        repo: str,
        tag: str,
        stamp: Stamp | None = None,
        actor: str | None = None,
        immutable: bool = False,
    ) -> bool:
        """Delete ``tag``; False when there is none. A local delete of an ``immutable``
        tag that exists raises TAG_IMMUTABLE, decided in the delete's transaction."""

    async def expire_tag(self, repo: str, tag: str, version: int) -> bool:
        """Retention: remove ``tag`` only if it still has ``version``. The tombstone keeps
        the tag's own version, so a peer still holding that tag does not bring it back
        and any newer push, anywhere, wins over it. Logged as a LOCAL_OPS entry."""

    async def delete_untagged_manifest(
        self, repo: str, digest: str, held_since: float | None = None
    ) -> list[str]:
        """Retention: delete a manifest no tag and no index hold any more, then each of its
        child manifests left the same way; returns those deleted (logged as LOCAL_OPS).
        With ``held_since``, the manifest also stays if ``untagged_manifests`` would not
        name it for that time (held or pushed since, or its subject present)."""

    async def untagged_manifests(self, repo: str, older_than: float) -> list[str]:
        """Manifests nothing has held since ``older_than``: no tag, no index listing them,
        no subject present, and neither pushed nor let go of after that time."""

    async def list_tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        """Tags in lexical order after ``last``; None when the repository is unknown."""

    async def tag_list_version(self, repo: str) -> tuple[int, int] | None:
        """A value that changes whenever the repository's tag list may have (a cached
        list is valid while it holds); None when the repository is unknown."""

    async def list_repositories(self, n: int | None, last: str | None) -> list[str]: ...

    # usage (protocol/quotas.py), kept in the write transactions
    async def usage(self, repo: str) -> Usage | None: ...
    async def usages(self, n: int | None, last: str | None) -> list[Usage]:
        """Every repository's usage, in name order after ``last``."""

    async def recount_usage(self, repo: str) -> Usage | None:
        """The usage counted from scratch (what the kept figures must equal)."""

    async def repository_listing(
        self, n: int | None, last: str | None, contains: str = ""
    ) -> list[tuple[Usage, float | None]]:
        """Repositories after ``last`` whose name contains ``contains``: their usage and
        when a tag of theirs was last pushed (None: no tag)."""

    async def tag_details(
        self, repo: str, n: int | None, last: str | None
    ) -> list[TagDetail] | None:
        """Tags after ``last`` with digest and push time; None when the repository is unknown."""

    async def referrers(self, repo: str, subject: str) -> list[ManifestRecord]: ...
    async def missing_manifests(self, repo: str, digests: Sequence[str]) -> list[str]: ...

    # blobs linked into repositories
    async def link_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Link a blob into a repository; ``publish`` (moving the file into place) runs
        under the same lock that ``forget_blob`` takes, so GC never races an upload."""

    async def blob_size(self, repo: str, digest: str) -> int | None: ...
    async def unlink_blob(self, repo: str, digest: str) -> bool: ...
    async def missing_blobs(self, repo: str, digests: Sequence[str]) -> list[str]: ...
    async def repositories_with_blob(self, digest: str) -> list[str]: ...

    # garbage collection
    async def unreferenced_blobs(self, older_than: float) -> list[str]:
        """Blobs no manifest references, last linked before ``older_than``. Links alone
        do not keep a blob: a layer whose image was deleted is garbage, as in distribution;
        the grace period protects pushes whose manifest has not arrived yet."""

    async def forget_blob(
        self, digest: str, older_than: float, remove: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        """Remove a blob's record and links if still unreferenced and not linked since
        ``older_than``, calling ``remove`` (delete the file) under the same lock; True when
        removed."""

    async def locked(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run a storage action under the write lock (no publish or collection meanwhile)."""

    async def recorded_blobs(self, digests: Sequence[str]) -> set[str]:
        """Which of ``digests`` the index has a record of."""

    async def forget_unrecorded(self, digest: str, remove: Callable[[], Awaitable[None]]) -> bool:
        """Call ``remove`` (delete the file) under the write lock if the blob still has no
        record: a file a crash left between being moved into place and being recorded.
        Files are only ever published under that lock, so none is caught half-way."""

    # replication
    async def pending_changes(self, peer: str, limit: int) -> list[Change]: ...
    async def ack_change(self, peer: str, seq: int) -> None: ...
    async def queue_stats(self, peer: str) -> tuple[int, float | None]:
        """(number of undelivered changes, creation time of the oldest one)."""

    async def repository_hash(self, repo: str) -> str | None:
        """Hash of a repository's tag states and referrers (anti-entropy); None if unknown."""

    async def tag_states(self, repo: str) -> list[TagState]: ...
    async def tag_stamps(self, repo: str, names: Sequence[str]) -> list[TagState]:
        """The state of the named tags (tombstones for deleted ones): the tag record's."""

    async def referrer_digests(self, repo: str) -> list[str]: ...
    async def referrer_states(self, repo: str) -> list[ReferrerState]: ...
    async def expire_tombstones(self, older_than: float) -> int: ...

    # failed authentication, shared by every process (storage/auth_failures.py)
    async def add_auth_failures(
        self, entries: Sequence[tuple[str, bytes, float]], now: float
    ) -> None:
        """Add seconds of draining to each (meter, key, seconds), as of wall time ``now``."""

    async def draining_auth_failures(self, now: float) -> list[tuple[str, bytes, float]]:
        """(meter, key, drained_at) of the keys not drained by ``now``."""
        ...

    # web UI sessions ended by logging out (storage/ended_sessions.py)
    async def end_session(self, token_id: str, expires_at: float) -> None:
        """Record the session ``token_id`` (valid until ``expires_at``) ended now, by the
        database's clock."""

    async def ended_sessions(self, since: float | None) -> tuple[list[tuple[str, float]], float]:
        """(token id, expires at) of the sessions ended after ``since`` (the database's
        clock; None: all), and that clock when the read began."""
        ...
