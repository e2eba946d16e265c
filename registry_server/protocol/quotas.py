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

import re
from collections.abc import Iterable
from dataclasses import dataclass

_QUANTITY = re.compile(r"(?P<number>[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_FACTORS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


class QuantityError(ValueError):
    pass


def parse_bytes(value: object) -> int:
    """A byte count from an integer or a Kubernetes-style quantity (``10Gi``, ``500M``)."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise QuantityError(f"{value!r} is not a size (negative)")
        return value
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value.strip())
        if match:
            return int(match["number"]) * _FACTORS[match["suffix"]]
    raise QuantityError(f"{str(value)[:60]!r} is not a size such as 10Gi, 500Mi or 2000000000")


def format_bytes(size: int) -> str:
    """A size as people read it (binary units, one decimal)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
