"""Hybrid logical clock versions and the last-writer-wins rule for tags (pure).

A version is ``physical_ms << 16 | counter``: it follows wall time, never goes backwards,
and orders causally related changes across regions once clocks are merged on receipt.
Two changes of one tag compare by (version, origin); the larger wins everywhere, so
concurrent writes in two regions converge to one result. Deletes are tombstones that take
part in the same comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry_server.protocol import errors

_COUNTER_BITS = 16


@dataclass(frozen=True, order=True)
class Stamp:
    version: int
    origin: str


def tick(last: int, now_ms: int) -> int:
    """The next local version after ``last`` at wall time ``now_ms``."""
    return max(now_ms << _COUNTER_BITS, last + 1)


def merge(last: int, received: int) -> int:
    """Clock state after seeing a remote version: never behind anything observed."""
    return max(last, received)


def wins(incoming: Stamp, current: Stamp | None) -> bool:
    """Whether ``incoming`` replaces ``current`` (None: nothing known yet)."""
    return current is None or incoming > current


def physical_ms(version: int) -> int:
    return version >> _COUNTER_BITS


# Headers a replicating peer sends with a manifest PUT or DELETE to carry the change's
# version; a plain client never sends them and gets a fresh local version instead.
VERSION_HEADER = "Berth-Replication-Version"
ORIGIN_HEADER = "Berth-Replication-Origin"
# A manifest or blob a peer sends without a stamp (by digest: a platform, a referrer, a
# layer): not the receiver's own push, so not held to its quota nor logged again.
REPLICATED_HEADER = "Berth-Replicated"
# With a referrer sent that way: its version when first stored (a clock version, as
# above), so that a receiver which has deleted it since does not take it back.
STORED_VERSION_HEADER = "Berth-Stored-Version"


# The index stores versions as signed 64-bit integers.
MAX_VERSION = (1 << 63) - 1
# ASCII digits only: int() would also take other scripts' digits, "_" and spaces.
_VERSION = re.compile(r"[0-9]{1,19}")
# A region name: visible ASCII, so it stores and prints as sent.
_ORIGIN = re.compile(r"[!-~]{1,63}")


# How far ahead of the receiving region's clock a stamp's physical time may be. A peer's
# clock further ahead would win every concurrent write and drag this region's clock along
# (up to the largest version, after which every local change failed): it is refused, as
# hybrid logical clocks bound drift.
MAX_AHEAD_SECONDS = 600.0


def is_origin(name: str) -> bool:
    """Whether ``name`` can be a region in a stamp."""
    return _ORIGIN.fullmatch(name) is not None


def too_far_ahead(stamp: Stamp, now: float) -> bool:
    return physical_ms(stamp.version) / 1000 > now + MAX_AHEAD_SECONDS


def from_headers(version: str | None, origin: str | None) -> Stamp | None:
    """The stamp a replicating peer sent, None for an ordinary request."""
    if version is None and origin is None:
        return None
    if not _VERSION.fullmatch(version or "") or int(version or "") > MAX_VERSION:
        raise errors.RegistryError(
            errors.MANIFEST_INVALID, detail={VERSION_HEADER: (version or "")[:40]}
        )
    if not _ORIGIN.fullmatch(origin or ""):
        raise errors.RegistryError(
            errors.MANIFEST_INVALID, detail={ORIGIN_HEADER: (origin or "")[:80]}
        )
    return Stamp(int(version or ""), origin or "")


def stored_version_from_header(value: str | None) -> int | None:
    """A referrer's version when first stored, as a peer sends it (None: not sent)."""
    if value is None:
        return None
    if not _VERSION.fullmatch(value) or int(value) > MAX_VERSION:
        raise errors.RegistryError(
            errors.MANIFEST_INVALID, detail={STORED_VERSION_HEADER: value[:40]}
        )
    return int(value)
