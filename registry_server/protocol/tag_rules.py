"""Per-repository tag rules: immutable tags and retention (pure: no I/O).

Tag patterns are shell-style globs over tag names (``v*``, ``release-?``), matched case
sensitively like tags themselves. Rules come from the policy file (docs/auth.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A tag's characters plus the glob operators; brackets are left out on purpose so a
# pattern reads the same to everyone who writes one.
_PATTERN = re.compile(r"[A-Za-z0-9_.*?-]{1,128}")


class TagPatternError(ValueError):
    pass


def validate_pattern(pattern: str) -> str:
    if not _PATTERN.fullmatch(pattern):
        raise TagPatternError(
            f"{pattern[:140]!r} is not a tag pattern (tag characters, '*' and '?'; 1-128)"
        )
    return pattern


def _matches(patterns: Iterable[str], tag: str) -> bool:
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Retention:
    """Keep the ``keep_last`` most recently pushed tags (None: every tag), and every
    protected one; remove manifests nothing has held for ``untagged_days`` (None: never):
    no tag points at them, no index lists them, and they refer to no manifest present."""

    keep_last: int | None
    protect: tuple[str, ...] = ()
    untagged_days: float | None = None


@dataclass(frozen=True)
class TagRules:
    immutable: tuple[str, ...] = ()
    retention: Retention | None = None

    def is_immutable(self, tag: str) -> bool:
        return _matches(self.immutable, tag)

    def expired(self, tags: Sequence[tuple[str, int]]) -> list[str]:
        """Which of ``tags`` (name, version: the push's clock) retention removes.

        Protected and immutable tags are always kept and do not count towards
        ``keep_last``; among the others the newest versions stay (ties: by name, so every
        region holding the same versions removes the same tags).
        """
        if self.retention is None or self.retention.keep_last is None:
            return []
        protect = (*self.retention.protect, *self.immutable)
        candidates = sorted(
            ((version, name) for name, version in tags if not _matches(protect, name)),
            reverse=True,
        )
        return sorted(name for _, name in candidates[self.retention.keep_last :])


NO_RULES = TagRules()


def _most(values: list[float | None]) -> float | None:
    """The limit that keeps the most among those the rules state (None: none does)."""
    stated = [v for v in values if v is not None]
    return max(stated) if stated else None


def combine(rules: Iterable[TagRules]) -> TagRules:
    """Several policy rules matching one repository: every immutable pattern holds, and
    retention keeps the most of what they state (the largest ``keep_last`` and
    ``untagged_days``, every protect pattern)."""
    immutable: list[str] = []
    retentions: list[Retention] = []
    protect: list[str] = []
    for rule in rules:
        immutable.extend(p for p in rule.immutable if p not in immutable)
        if rule.retention is not None:
            retentions.append(rule.retention)
            protect.extend(p for p in rule.retention.protect if p not in protect)
    if not retentions:
        return TagRules(tuple(immutable))
    keep = _most([r.keep_last for r in retentions])
    untagged = _most([r.untagged_days for r in retentions])
    retention = Retention(None if keep is None else int(keep), tuple(protect), untagged)
    return TagRules(tuple(immutable), retention)
