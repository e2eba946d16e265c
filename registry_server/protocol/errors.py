"""The registry error catalogue, declared once.

Handlers raise these; one middleware renders them as
``{"errors": [{"code", "message", "detail"}]}`` with the declared status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ErrorCode:
    code: str
    message: str
    status: int


BLOB_UNKNOWN = ErrorCode("BLOB_UNKNOWN", "blob unknown to registry", 404)
BLOB_UPLOAD_INVALID = ErrorCode("BLOB_UPLOAD_INVALID", "blob upload invalid", 400)
BLOB_UPLOAD_UNKNOWN = ErrorCode("BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", 404)
DIGEST_INVALID = ErrorCode("DIGEST_INVALID", "provided digest did not match uploaded content", 400)
MANIFEST_BLOB_UNKNOWN = ErrorCode(
    "MANIFEST_BLOB_UNKNOWN", "manifest references a manifest or blob unknown to registry", 400
)
MANIFEST_INVALID = ErrorCode("MANIFEST_INVALID", "manifest invalid", 400)
MANIFEST_UNKNOWN = ErrorCode("MANIFEST_UNKNOWN", "manifest unknown to registry", 404)
NAME_INVALID = ErrorCode("NAME_INVALID", "invalid repository name", 400)
NAME_UNKNOWN = ErrorCode("NAME_UNKNOWN", "repository name not known to registry", 404)
SIZE_INVALID = ErrorCode("SIZE_INVALID", "provided length did not match content length", 400)
UNAUTHORIZED = ErrorCode("UNAUTHORIZED", "authentication required", 401)
DENIED = ErrorCode("DENIED", "requested access to the resource is denied", 403)
UNSUPPORTED = ErrorCode("UNSUPPORTED", "the operation is unsupported", 405)
TOO_MANY_REQUESTS = ErrorCode("TOOMANYREQUESTS", "too many requests", 429)
# Not in the spec's list but needed for correct statuses; codes stay within the catalogue above.
RANGE_INVALID = ErrorCode("BLOB_UPLOAD_INVALID", "invalid content range", 416)
# Two requests wrote one upload at once (possible only across replicas): this one lost.
UPLOAD_CONFLICT = ErrorCode(
    "BLOB_UPLOAD_INVALID",
    "the upload was written by another request meanwhile: get its status and resume",
    416,
)
MANIFEST_TOO_LARGE = ErrorCode("SIZE_INVALID", "manifest exceeds the size limit", 413)
BODY_TOO_LARGE = ErrorCode("SIZE_INVALID", "request body exceeds the size limit", 413)
TAG_INVALID = ErrorCode("MANIFEST_INVALID", "invalid tag", 400)
TAG_IMMUTABLE = ErrorCode("DENIED", "tag is immutable", 409)
# Deleting a platform manifest would leave the index listing it broken (as zot and
# GitLab's registry refuse it; distribution allows it).
MANIFEST_LISTED = ErrorCode(
    "DENIED", "the manifest is listed by an index in the repository: delete the index first", 409
)
# A push that would take a repository over its quota (protocol/quotas.py).
QUOTA_EXCEEDED = ErrorCode("DENIED", "repository quota exceeded", 403)
# The spec's UNSUPPORTED covers "a missing implementation or invalid set of parameters".
PAGINATION_INVALID = ErrorCode("UNSUPPORTED", "invalid number of results requested", 400)
BODY_INVALID = ErrorCode("UNSUPPORTED", "invalid request body", 400)
ROUTE_UNKNOWN = ErrorCode("UNSUPPORTED", "endpoint not found", 404)
METHOD_NOT_ALLOWED = ErrorCode("UNSUPPORTED", "method not allowed", 405)
# Requests the HTTP parser refuses before any route sees them.
REQUEST_MALFORMED = ErrorCode("UNSUPPORTED", "malformed HTTP request", 400)
METHOD_UNKNOWN = ErrorCode("UNSUPPORTED", "unknown HTTP method", 400)
# 5xx: the server's fault, not the client's; UNKNOWN is the one code outside the spec's list.
INTERNAL = ErrorCode("UNKNOWN", "unknown error", 500)
TIMEOUT = ErrorCode("UNKNOWN", "the request timed out", 504)
# The volume is (nearly) full: pushes wait until space is freed (deletes, GC); pulls go on.
STORAGE_FULL = ErrorCode(
    "UNKNOWN", "storage full: the registry's volume has no space left for writes", 507
)
# A back end (the index's database, the object store) cannot be reached: try again (this
# replica has left its Service meanwhile, /readyz says so). The message names which.
BACKEND_UNAVAILABLE = ErrorCode(
    "UNKNOWN", "service unavailable: the registry cannot reach a storage back end", 503
)
BACKEND_UNAVAILABLE_RETRY_AFTER = 5
# Pull-through cache (docs/pull-through-cache.md): mirrored repositories take no pushes,
# and what the upstream could not deliver, with nothing cached, is its fault (502).
CACHE_READ_ONLY = ErrorCode(
    "DENIED", "repository is a pull-through cache of an upstream registry: read-only", 403
)
UPSTREAM_UNAVAILABLE = ErrorCode("UNKNOWN", "upstream registry unavailable", 502)
UPSTREAM_TOO_MANY_REQUESTS = ErrorCode(
    "TOOMANYREQUESTS", "the upstream registry refused: too many requests", 429
)
UPSTREAM_DIGEST_MISMATCH = ErrorCode(
    "UNKNOWN", "upstream sent content that does not match its digest", 502
)
# A replicated change stamped too far ahead of this region's clock: the clocks must be
# put right; the sender waits and tries again (a 4xx would make it drop the change).
CLOCK_AHEAD = ErrorCode(
    "UNKNOWN", "the change's clock is too far ahead of this region's: check both clocks", 503
)
CLOCK_AHEAD_RETRY_AFTER = 30
# Seconds a client refused for a full volume is asked to wait before retrying.
STORAGE_FULL_RETRY_AFTER = 30


@dataclass
class RegistryError(Exception):
    """An error a client sees, in the protocol's own format."""

    error: ErrorCode
    detail: Any = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.error.code}: {self.message or self.error.message} ({self.detail!r})"

    @property
    def status(self) -> int:
        return self.error.status

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "code": self.error.code,
            "message": self.message or self.error.message,
        }
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}
