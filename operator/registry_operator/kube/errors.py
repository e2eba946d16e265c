"""API errors, converted once into what callers act on."""

from __future__ import annotations

import json
from typing import Any


class KubeError(Exception):
    """A failed API call; `status` is the HTTP status (0 when no response came)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


class NotFound(KubeError):
    """The object (or its API) does not exist."""


class Conflict(KubeError):
    """AlreadyExists or a stale resourceVersion: re-read and decide again."""


class Retryable(KubeError):
    """The server or the network failed, or we are throttled: try again later."""


class Expired(KubeError):
    """A watch's resourceVersion is too old (410 Gone): list again."""


class Rejected(KubeError):
    """The server refused the object itself (invalid, forbidden field): retrying the same
    request cannot succeed until something (usually the spec) changes."""


def _message(body: Any, fallback: str) -> tuple[str, str]:
    try:
        data = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        return str(data.get("message") or fallback), str(data.get("reason") or "")
    return fallback, ""


def from_status(status: int, body: Any, fallback: str = "") -> KubeError:
    """Classify an HTTP error response from the API server."""
    message, reason = _message(body, fallback or f"HTTP {status}")
    if status == 404:
        return NotFound(message, status, reason)
    if status == 409:
        return Conflict(message, status, reason)
    if status in (400, 422):
        return Rejected(message, status, reason)
    if status == 403 and not _rbac(message):
        # An admission plugin refused the object (a claim its class cannot resize, an
        # exceeded quota, a webhook): asking again the same way fails the same way.
        return Rejected(message, status, reason)
    # 401, and 403 from RBAC, are usually RBAC being installed or fixed; 429 and 5xx
    # are transient.
    return Retryable(message, status, reason)


def _rbac(message: str) -> bool:
    """Whether a 403 is the authorizer's ('User "..." cannot patch resource ...')."""
    return " cannot " in message and " resource " in message
