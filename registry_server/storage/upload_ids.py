"""Upload session ids, pure: what a session's id says about it without a read.

An id is a UUIDv7, whose first 48 bits are the session's start in milliseconds, then a
dot and 16 hex digits of the sha256 of the repository it was started for. The id names
the session's directory, so a session is found only through the repository it belongs
to, and its age is known from its name: the store holds its data and nothing else (an
info file, one more write per upload and one more read per replica, did this before).
Ids of that earlier form, plain UUIDs with an info file, are still recognised.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

_BINDING = 16  # hex digits of the repository's sha256
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class UploadId:
    started_at: float  # Unix time, to the millisecond
    binding: str


def binding(repository: str) -> str:
    return hashlib.sha256(repository.encode()).hexdigest()[:_BINDING]


def new(repository: str, now: float) -> str:
    """A fresh id for a session of ``repository`` started at ``now``."""
    value = (int(now * 1000) & (2**48 - 1)) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    value = (value & ~(0xF << 76)) | 7 << 76  # version 7
    value = (value & ~(0x3 << 62)) | 0x2 << 62  # the RFC 9562 variant
    return f"{uuid.UUID(int=value)}.{binding(repository)}"


def parse(upload_id: str) -> UploadId | None:
    """What an id of the current form says; None for anything else."""
    head, dot, bound = upload_id.partition(".")
    if not dot or len(bound) != _BINDING or not set(bound) <= _HEX:
        return None
    try:
        value = uuid.UUID(head)
    except ValueError:
        return None
    if str(value) != head or value.version != 7:
        return None
    return UploadId((value.int >> 80) / 1000, bound)


def belongs(upload_id: str, repository: str) -> bool:
    """Whether a current-form id was made for ``repository``."""
    parsed = parse(upload_id)
    return parsed is not None and parsed.binding == binding(repository)


def is_legacy(upload_id: str) -> bool:
    """A plain UUID: a session of the earlier form, described by its info file."""
    try:
        return str(uuid.UUID(upload_id)) == upload_id
    except ValueError:
        return False
