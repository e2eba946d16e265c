"""API objects as plain mappings: whether one already holds what the operator writes.

Pure: no I/O here. The API server adds defaults and other tools add fields of their
own, so an object is unchanged when every field the operator sets has the value it
sets, not when it is equal to the manifest. `reconcile` tells real changes from echoes
with it and skips rewriting local-registry-hosting; `granting` skips writing Secrets
that are current.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def contains(actual: Any, desired: Any) -> bool:
    """Whether every field of `desired` has its value in `actual` (extra fields allowed;
    a list must match item by item, as a list field is replaced whole)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and contains(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)
