"""Pull-through cache rules: which upstream a repository mirrors, under which name, when a
cached tag must be asked about again, what eviction removes. Pure: no I/O here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Docker Hub's official images live in "library/"; `docker pull nginx` means library/nginx.
DOCKER_LIBRARY = "library"


@dataclass(frozen=True)
class Mirror:
    """One upstream as the routing rules see it."""

    name: str
    prefix: str  # local repositories "<prefix>/..." mirror the upstream's "..."
    hosts: tuple[str, ...]  # containerd's ?ns= values that select this upstream
    docker_library: bool  # map single-component names to library/<name>, as Docker does


@dataclass(frozen=True)
class Target:
    """A pull that the cache serves: the local repository and the upstream's name for it."""

    mirror: Mirror
    local: str
    remote: str


@dataclass
class UpstreamFailure(Exception):
    """The upstream did not answer usefully. ``status`` is its HTTP status (None: no
    answer at all: refused, reset, timed out). Not frozen: raising sets attributes on
    an exception (a context manager it passes through sets its ``__traceback__``)."""

    upstream: str
    reason: str
    status: int | None = None
    timed_out: bool = False  # no answer in time (connecting, or between two reads)

    def __str__(self) -> str:
        return f"upstream {self.upstream}: {self.reason}"

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


def remote_name(rest: str, mirror: Mirror) -> str:
    if mirror.docker_library and "/" not in rest:
        return f"{DOCKER_LIBRARY}/{rest}"
    return rest


def resolve(name: str, ns: str | None, mirrors: Sequence[Mirror]) -> Target | None:
    """The cache target of a request for repository ``name`` (with containerd's ``ns``),
    or None when the repository is an ordinary local one.

    With ``ns`` naming a mirrored host, the client asked for the host's own name (a
    containerd mirror request): the local repository is that name under the prefix.
    Without it, the longest prefix the name starts with decides.
    """
    if ns:
        host = ns.lower()
        for mirror in mirrors:
            if host in mirror.hosts:
                local = name if name.startswith(f"{mirror.prefix}/") else f"{mirror.prefix}/{name}"
                return Target(mirror, local, remote_name(local[len(mirror.prefix) + 1 :], mirror))
    best: Mirror | None = None
    for mirror in mirrors:
        if name.startswith(f"{mirror.prefix}/") and (
            best is None or len(mirror.prefix) > len(best.prefix)
        ):
            best = mirror
    if best is None:
        return None
    return Target(best, name, remote_name(name[len(best.prefix) + 1 :], best))


def needs_revalidation(checked_at: float | None, now: float, ttl: float) -> bool:
    """A cached tag is asked about again (HEAD) once its last check is ``ttl`` old."""
    return checked_at is None or now - checked_at >= ttl


def serves_stale(failure: UpstreamFailure) -> bool:
    """Whether a cached copy answers instead of the failure: anything but the upstream
    saying the content is gone (404) is the upstream's trouble, not the image's."""
    return not failure.not_found


def warning(failure: UpstreamFailure) -> str:
    """RFC 7234 warn-code 110 (Response is Stale), naming the upstream and why. The reason
    quotes the upstream's reply (an error page, a JSON line): whatever a quoted string
    may not hold goes, or the header could not be sent and the cached copy not served."""
    text = f"cached content served: {failure}".replace('"', "'").replace("\\", "/")
    printable = "".join(c if " " <= c <= "~" else " " for c in text)
    return f'110 berth "{" ".join(printable.split())[:200]}"'


def evicted(
    tags: Sequence[tuple[str, float]], now: float, keep_last: int, max_idle_seconds: float
) -> list[str]:
    """The tags eviction removes, from (tag, last pulled) pairs: those not pulled for
    ``max_idle_seconds`` and those beyond the ``keep_last`` most recently pulled
    (0 switches either rule off)."""
    order = sorted(tags, key=lambda t: (-t[1], t[0]))
    gone = []
    for position, (tag, pulled) in enumerate(order):
        idle = max_idle_seconds > 0 and now - pulled >= max_idle_seconds
        beyond = keep_last > 0 and position >= keep_last
        if idle or beyond:
            gone.append(tag)
    return gone


@dataclass(frozen=True)
class UpstreamManifest:
    """What the upstream said about a manifest: its digest (Docker-Content-Digest, when
    it sent one), media type, and the bytes (None for a HEAD)."""

    digest: str | None
    media_type: str | None
    content: bytes | None
