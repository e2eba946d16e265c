"""Repository quotas and what counts against them (pure: no I/O).

A repository's usage is what its manifests hold: every blob they reference, counted
once per repository however many manifests or tags share it (a layer in two
repositories counts in each, as Harbor counts per project: each team pays for what it
can pull, and deleting one repository frees exactly its own figure), plus the
manifests' own bytes. Uploaded blobs no manifest references yet do not count: they are
garbage after the collector's grace period. Quotas come from the policy file
(docs/auth.md); several rules matching one repository all hold (the smallest limit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from registry_server.protocol import errors
from registry_server.protocol.sizes import format_bytes


@dataclass(frozen=True)
class Usage:
    """What one repository holds (see the module's docstring for what counts)."""

    repository: str
    storage: int  # bytes
    tags: int
    manifests: int


@dataclass(frozen=True)
class Quota:
    """Limits for a repository; None: no limit on that dimension."""

    storage: int | None = None
    tags: int | None = None

    def exceeded_by(self, before: Usage, after: Usage) -> str | None:
        """Why a change from ``before`` to ``after`` is refused, or None if it may go.

        Only growth past a limit is refused: a push that adds nothing to a repository
        already over its quota (the quota was lowered) still goes, and so does any
        delete."""
        storage = self.storage
        if storage is not None and after.storage > max(storage, before.storage):
            return (
                f"storage quota exceeded: repository {after.repository} would store"
                f" {format_bytes(after.storage)} ({after.storage} bytes), over its quota"
                f" of {format_bytes(storage)} ({storage} bytes); it stores"
                f" {format_bytes(before.storage)} now"
            )
        if self.tags is not None and after.tags > max(self.tags, before.tags):
            return (
                f"tag quota exceeded: repository {after.repository} would have {after.tags}"
                f" tags, over its quota of {self.tags}; it has {before.tags} now"
            )
        return None

    def full(self, usage: Usage) -> str | None:
        """Why new uploads are refused early: the repository is already at its storage
        quota, so no manifest adding a blob could be pushed."""
        if self.storage is not None and usage.storage >= self.storage:
            return (
                f"storage quota exceeded: repository {usage.repository} stores"
                f" {format_bytes(usage.storage)} ({usage.storage} bytes) of its quota of"
                f" {format_bytes(self.storage)} ({self.storage} bytes); delete tags or"
                " manifests to push more"
            )
        return None


NO_QUOTA = Quota()


def refused(reason: str, usage: Usage, quota: Quota) -> errors.RegistryError:
    """The protocol's error for a push or upload ``quota`` refuses (``reason`` from
    ``Quota.exceeded_by`` or ``Quota.full``)."""
    return errors.RegistryError(
        errors.QUOTA_EXCEEDED,
        message=reason,
        detail={
            "repository": usage.repository,
            "storage": usage.storage,
            "tags": usage.tags,
            "quota": {"storage": quota.storage, "tags": quota.tags},
        },
    )


def combine(quotas: Iterable[Quota]) -> Quota:
    """Every matching rule's quota holds: the smallest limit of each kind."""
    storage: int | None = None
    tags: int | None = None
    for quota in quotas:
        if quota.storage is not None:
            storage = quota.storage if storage is None else min(storage, quota.storage)
        if quota.tags is not None:
            tags = quota.tags if tags is None else min(tags, quota.tags)
    return Quota(storage, tags)
