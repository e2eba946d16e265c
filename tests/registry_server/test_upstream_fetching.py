"""The pull-through cache's upstream client: what fails is told apart. A failure of the
upstream (an error status, a dropped transfer) is an UpstreamFailure; what the cache's
own work raises while the reply is open (its storage timing out, say) goes out as it
is, neither reported to the client as the upstream's fault nor counted as one."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from registry_server.config import UpstreamConfig
from registry_server.events import upstream_fetching
from registry_server.events.upstream_fetching import UpstreamFetcher
from registry_server.protocol.upstreams import UpstreamFailure
from registry_server.services.pull_through import _reason

DIGEST = "sha256:" + "0" * 64


@pytest.fixture
async def fetcher(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[UpstreamFetcher]:
    monkeypatch.setattr(upstream_fetching, "_BLOB_READ_TIMEOUT", 0.3)

    async def blob(request: web.Request) -> web.Response:
        if request.match_info["repo"] == "missing":
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.match_info["repo"] == "stalls":
            reply = web.StreamResponse()
            reply.content_length = 1000
            await reply.prepare(request)
            await reply.write(b"x" * 100)
            await asyncio.sleep(5)
            return reply
        return web.Response(body=b"x" * 1000)

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(
            headers={"Docker-Content-Digest": DIGEST, "Content-Type": "application/x-test"}
        )

    app = web.Application()
    app.router.add_get("/v2/{repo}/blobs/{digest}", blob)
    app.router.add_route("HEAD", "/v2/{repo}/manifests/{reference}", manifest)
    async with TestServer(app) as server:
        fetcher = UpstreamFetcher(
            UpstreamConfig(name="up", url=str(server.make_url("")).rstrip("/"), prefix="m"),
            1 << 20,
        )
        try:
            yield fetcher
        finally:
            await fetcher.close()


async def test_the_blob_streams(fetcher: UpstreamFetcher) -> None:
    async with fetcher.blob("repo", DIGEST) as (size, chunks):
        assert size == 1000
        assert b"".join([chunk async for chunk in chunks]) == b"x" * 1000


async def test_an_error_status_is_the_upstreams_failure(fetcher: UpstreamFetcher) -> None:
    with pytest.raises(UpstreamFailure) as failed:
        async with fetcher.blob("missing", DIGEST):
            pass
    assert failed.value.status == 404


async def test_an_upstream_gone_silent_is_a_timeout(fetcher: UpstreamFetcher) -> None:
    """Counted as one (berth_cache_upstream_errors_total{reason="timeout"}), not as an
    upstream that cannot be reached."""
    with pytest.raises(UpstreamFailure) as failed:
        async with fetcher.blob("stalls", DIGEST) as (_, chunks):
            async for _ in chunks:
                pass
    assert failed.value.timed_out and failed.value.status is None
    assert _reason(failed.value) == "timeout"


async def test_blob_transfers_do_not_hold_up_a_manifest(
    fetcher: UpstreamFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hundred fills under way (aiohttp's pool size) from a slow upstream: a tag's
    HEAD still gets a connection at once, and answers (review: it queued behind them,
    timed out, and the stale copy was served with the upstream blamed)."""
    monkeypatch.setattr(upstream_fetching, "_BLOB_READ_TIMEOUT", 30.0)  # slow, not stalled
    started = asyncio.Event()
    opened = 0

    async def stalled_fill() -> None:
        nonlocal opened
        async with fetcher.blob("stalls", DIGEST) as (_, chunks):
            opened += 1
            if opened == 100:
                started.set()
            async for _ in chunks:
                pass

    fills = [asyncio.ensure_future(stalled_fill()) for _ in range(100)]
    try:
        async with asyncio.timeout(10):
            await started.wait()
        async with asyncio.timeout(2):
            got = await fetcher.manifest("repo", "latest", head=True)
        assert got.digest == DIGEST
    finally:
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*fills, return_exceptions=True)


@pytest.mark.parametrize(
    "local",
    [OSError(errno.ETIMEDOUT, "the store timed out"), TimeoutError(), OSError(errno.EIO, "")],
)
async def test_the_caches_own_failure_is_not_the_upstreams(
    fetcher: UpstreamFetcher, local: OSError
) -> None:
    with pytest.raises(OSError) as raised:
        async with fetcher.blob("repo", DIGEST) as (_, chunks):
            async for _ in chunks:
                pass
            raise local
    assert raised.value is local
