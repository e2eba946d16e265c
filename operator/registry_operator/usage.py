"""What a Repository's path stores, as its registry server reports it, and whether it is
at its quota: `status.usage` and the QuotaExceeded condition (pure).

The poller reads the server's `GET /berth/v1/usage` (every repository, paged) once per
Registry and poll interval; the access reconcile turns it into each Repository's status.
A pattern path sums the repositories it matches; its quota holds for each of them, so
the condition names the first one at its limit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from registry_operator import models, patterns
from registry_operator.status import Condition, rfc3339

QUOTA_EXCEEDED = "QuotaExceeded"


@dataclasses.dataclass(frozen=True)
class Figures:
    storage: int
    tags: int
    manifests: int


@dataclasses.dataclass(frozen=True)
class Observation:
    """The server's answer: each repository's figures and since when the operator has
    seen them as they are (so a status is rewritten only when they change); or why
    there is no answer."""

    repositories: Mapping[str, tuple[Figures, float]] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @functools.cached_property
    def by_first_component(self) -> Mapping[str, tuple[str, ...]]:
        """Repository names by their first path component: a pattern whose first
        component is literal (`team-a/*`) is matched against its group only, not against
        every repository of the registry (10,000 Repositories, 10,000 repositories)."""
        groups: dict[str, list[str]] = {}
        for name in self.repositories:
            groups.setdefault(name.split("/", 1)[0], []).append(name)
        return {first: tuple(names) for first, names in groups.items()}


def observe(
    answer: Iterable[Mapping[str, Any]], previous: Observation | None, now: float
) -> Observation:
    """An observation from the server's entries, keeping the time of figures unchanged
    since the previous one."""
    before = previous.repositories if previous is not None else {}
    found: dict[str, tuple[Figures, float]] = {}
    for entry in answer:
        name = entry.get("repository")
        if not isinstance(name, str):
            continue
        try:
            figures = Figures(int(entry["storage"]), int(entry["tags"]), int(entry["manifests"]))
        except (KeyError, TypeError, ValueError):
            continue
        known = before.get(name)
        found[name] = (figures, known[1] if known is not None and known[0] == figures else now)
    return Observation(found)


def quantity(size: int) -> str:
    """Bytes as a short quantity for `kubectl get` (binary suffixes, at most one decimal,
    rounded down so that a figure never reads as more than is stored)."""
    value = float(size)
    for suffix in ("", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or suffix == "Ti":
            if not suffix:
                return str(size)
            text = f"{int(value * 10) / 10:.1f}".removesuffix(".0")
            return text + suffix
        value /= 1024
    raise AssertionError("unreachable")


def matched(path: str, observation: Observation) -> list[tuple[str, Figures, float]]:
    repositories = observation.repositories
    if not patterns.is_pattern(path):
        found = repositories.get(path)
        return [] if found is None else [(path, *found)]
    first = patterns.first_component(path)
    candidates = observation.by_first_component.get(first, ()) if first else repositories
    return [(name, *repositories[name]) for name in candidates if patterns.matches(path, name)]


def status_fields(path: str, observation: Observation | None) -> dict[str, Any]:
    """`{"usage": ...}` for the status; {} when the server has not answered."""
    if observation is None or observation.error is not None:
        return {}
    found = matched(path, observation)
    storage = sum(f.storage for _, f, _ in found)
    usage: dict[str, Any] = {
        "storage": quantity(storage),
        "storageBytes": storage,
        "tags": sum(f.tags for _, f, _ in found),
        "manifests": sum(f.manifests for _, f, _ in found),
    }
    if patterns.is_pattern(path):
        usage["repositories"] = len(found)
    if found:
        usage["updated"] = rfc3339(max(since for _, _, since in found))
    return {"usage": usage}


def quota_condition(
    repository: models.Repository, observation: Observation | None
) -> Condition | None:
    """True while a repository of the path is at a limit (its next growth is refused);
    None when the Repository sets no quota."""
    quota = repository.quota
    if quota is None:
        return None
    if observation is None or observation.error is not None:
        why = observation.error if observation is not None else "not read yet"
        return Condition(QUOTA_EXCEEDED, "Unknown", "UsageUnknown", why or "")
    found = sorted(matched(repository.path, observation))
    for name, figures, _ in found:
        if quota.storage is not None and figures.storage >= quota.storage:
            return Condition(
                QUOTA_EXCEEDED,
                "True",
                "StorageQuotaReached",
                f"{name} stores {quantity(figures.storage)} of its {quantity(quota.storage)}"
                " quota: pushes that add to it are refused",
            )
        if quota.tags is not None and figures.tags >= quota.tags:
            return Condition(
                QUOTA_EXCEEDED,
                "True",
                "TagQuotaReached",
                f"{name} has {figures.tags} of its {quota.tags} tags: new tags are refused",
            )
    told = []
    if quota.storage is not None:
        largest = max((f.storage for _, f, _ in found), default=0)
        told.append(f"storage {quantity(largest)} of {quantity(quota.storage)}")
    if quota.tags is not None:
        most = max((f.tags for _, f, _ in found), default=0)
        told.append(f"tags {most} of {quota.tags}")
    return Condition(QUOTA_EXCEEDED, "False", "WithinQuota", "; ".join(told))
