"""A cached tag whose upstream moved it to a manifest the cache refuses
(services/pull_through.py, _revalidate): the cached copy is served with a Warning, and
the tag is asked about again after the TTL, or within 30 s when the bytes did not match
their digest (one bad node of a CDN may answer the next time). Real storage and index;
the upstream is a dict in memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from registry_server.protocol import upstreams
from registry_server.protocol.upstreams import Mirror, UpstreamManifest
from registry_server.services.pull_through import PullThrough, Settings
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.sqlite_index import SqliteIndex

OCI = "application/vnd.oci.image.manifest.v1+json"
TTL = 100.0


def _manifest(nonce: str) -> bytes:
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 1}
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                       "digest": "sha256:" + hashlib.sha256(nonce.encode()).hexdigest()},
            "layers": [{**layer, "digest": "sha256:" + "ab" * 32}],
        }
    ).encode()  # fmt: skip


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class Tags:
    """An upstream with one tag: its HEAD names ``digest``, its GET sends ``body``."""

    def __init__(self, body: bytes) -> None:
        self.digest, self.body = _digest(body), body
        self.gets = 0

    async def manifest(self, repo: str, reference: str, head: bool) -> UpstreamManifest:
        if head:
            return UpstreamManifest(self.digest, OCI, None)
        self.gets += 1
        return UpstreamManifest(self.digest, OCI, self.body)

    async def has_blob(self, repo: str, digest: str) -> bool:
        raise AssertionError("no blob here")

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: str, digest: str
    ) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        raise AssertionError("no blob here")
        yield  # pragma: no cover

    async def close(self) -> None:
        pass


def _cache(tmp_path: Path, upstream: Tags) -> PullThrough:
    return PullThrough(
        [Mirror("up", "mirror", ("up.example",), False)],
        {"up": Settings(TTL, 5.0, 0, 0.0)},
        {"up": upstream},
        BlobStore(FilesystemDriver(tmp_path / "storage")),
        SqliteIndex(tmp_path / "index.db"),
        4096,
    )


async def _moved(tmp_path: Path, body: bytes, digest: str) -> tuple[PullThrough, Tags, float]:
    """A cache holding the tag, then the upstream moved it (HEAD: ``digest``, GET:
    ``body``) and the TTL went by: the pull that revalidates gets the cached copy with a
    Warning. Returns the cache, the upstream and when the tag counts as checked."""
    upstream = Tags(_manifest("first"))
    cache = _cache(tmp_path, upstream)
    assert await cache.manifest("mirror/app", "v1") is None
    assert upstream.gets == 1
    upstream.digest, upstream.body = digest, body
    key = ("mirror/app", "v1")
    cache._checked[key] -= TTL + 1  # the TTL went by
    warning = await cache.manifest("mirror/app", "v1")
    assert warning is not None and "refused" in warning, warning
    assert upstream.gets == 2
    return cache, upstream, cache._checked[key]


async def test_a_mismatched_manifest_is_asked_about_again_within_half_a_minute(
    tmp_path: Path,
) -> None:
    other = _manifest("other")
    _, _, checked = await _moved(tmp_path, other, _digest(_manifest("moved")))
    now = time.monotonic()
    assert not upstreams.needs_revalidation(checked, now + 20, TTL)
    assert upstreams.needs_revalidation(checked, now + 31, TTL)


async def test_a_manifest_over_the_limit_is_asked_about_again_after_the_ttl(
    tmp_path: Path,
) -> None:
    big = json.dumps({**json.loads(_manifest("big")), "annotations": {"pad": "x" * 5000}})
    cache, upstream, checked = await _moved(tmp_path, big.encode(), _digest(big.encode()))
    now = time.monotonic()
    assert not upstreams.needs_revalidation(checked, now + 31, TTL)
    assert upstreams.needs_revalidation(checked, now + TTL + 1, TTL)
    # Meanwhile the cached copy is served without asking.
    assert await cache.manifest("mirror/app", "v1") is None
    assert upstream.gets == 2
