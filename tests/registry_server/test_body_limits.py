"""Every body read into memory has a bound of its own: requests (the replication messages,
the token form, manifests) and replies (from peers and webhook receivers). Streamed blob
bodies stay unbounded. Also: /metrics labels take no arbitrary client strings.

The peak-memory measurements against a real process are in
tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from registry_server.app import build_app
from registry_server.config import (
    AuthConfig,
    Config,
    EndpointConfig,
    NotificationsConfig,
    PeerConfig,
    StorageConfig,
)
from registry_server.events import notifier, peer_client

Client = TestClient[Any, Any]
MiB = 1 << 20


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    app = build_app(Config(storage=StorageConfig(root=tmp_path)))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _pieces(*parts: bytes, pause: float = 0.05) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(pause)


def _code(payload: Any) -> str:
    code: str = payload["errors"][0]["code"]
    return code


# -- request bodies -----------------------------------------------------------------------

HASHES = "/berth/v1/replication/hashes"


async def test_replication_message_over_its_limit_is_413(client: Client) -> None:
    names = json.dumps({"repositories": ["a" * 200] * 20_000}).encode()  # ~4 MiB
    declared = await client.post(HASHES, data=names)
    assert declared.status == 413, await declared.text()
    assert _code(await declared.json()) == "SIZE_INVALID"
    # Without a Content-Length the limit is found while streaming.
    streamed = await client.post(HASHES, data=_pieces(names[: 2 * MiB], names[2 * MiB :]))
    assert streamed.status == 413, await streamed.text()


async def test_replication_message_that_is_not_one_is_400(client: Client) -> None:
    for body in (b"not json", b"[]", b'{"repositories": "a"}', b'{"repositories": ["A"]}'):
        response = await client.post(HASHES, data=body)
        assert response.status == 400, (body, await response.text())
        assert _code(await response.json()) in {"UNSUPPORTED", "NAME_INVALID"}
    good = await client.post(HASHES, data=_pieces(b'{"repositories": ', b'["a/b"]}'))
    assert good.status == 200, await good.text()
    assert await good.json() == {"hashes": {}}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Client]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'alice-pw', bcrypt.gensalt(4)).decode()}\n")
    config = Config(
        storage=StorageConfig(root=tmp_path / "storage"), auth=AuthConfig(htpasswd=htpasswd)
    )
    async with TestClient(TestServer(build_app(config))) as client:
        yield client


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_token_form_is_read_whole_when_it_arrives_in_pieces(secured: Client) -> None:
    body = _pieces(b"grant_type=password&username=al", b"ice&password=alice-pw&scope=x")
    response = await secured.post("/token", data=body, headers=FORM)
    assert response.status == 200, await response.text()
    assert "access_token" in await response.json()


async def test_token_form_over_its_limit_is_413(secured: Client) -> None:
    big = b"grant_type=password&username=alice&password=" + b"x" * (256 * 1024)
    for data in (big, _pieces(big[:1000], big[1000:])):
        response = await secured.post("/token", data=data, headers=FORM)
        assert response.status == 413, await response.text()
        assert (await response.json())["error"] == "invalid_request"


# -- replies from peers and webhook receivers ----------------------------------------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _endless_reply(request: web.Request) -> web.StreamResponse:
    """A body that does not end: 8 MiB at once, then nothing until the client gives up."""
    headers = {"Content-Type": "application/json", "Location": "/v2/a/b/blobs/uploads/x"}
    response = web.StreamResponse(status=202 if request.method == "POST" else 200)
    response.headers.update(headers)
    await response.prepare(request)
    for _ in range(128):
        await response.write(b" " * (64 * 1024))
    await asyncio.sleep(60)
    return response


@pytest.fixture
async def peer() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _endless_reply)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


async def test_peer_replies_are_read_within_a_bound(
    peer: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_client, "MAX_JSON_REPLY", 2 * MiB)
    config = PeerConfig(name="p", url=str(peer.make_url("")).rstrip("/"))
    async with peer_client.aiohttp.ClientSession() as session:
        remote = peer_client.PeerClient(config, session)
        # A reply whose body is not needed is not read past a small bound ...
        location = await asyncio.wait_for(remote.start_upload("a/b", "sha256:" + "a" * 64, None), 5)
        assert location is not None and location.endswith("/v2/a/b/blobs/uploads/x")
        # ... and one that is needed is refused once it passes its limit.
        with pytest.raises(peer_client.PeerError, match="larger than"):
            await asyncio.wait_for(remote.get_json("/berth/v1/replication/state"), 5)


async def test_webhook_replies_are_read_within_a_bound(peer: TestServer) -> None:
    endpoint = EndpointConfig(name="hook", url=str(peer.make_url("/hook")), timeout_seconds=60)
    sender = notifier.Notifier(NotificationsConfig((endpoint,)), None, None)  # type: ignore[arg-type]
    async with peer_client.aiohttp.ClientSession() as session:
        delivery = sender._deliver(session, True, endpoint, [{"action": "push"}])
        await asyncio.wait_for(delivery, 5)


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_labels_take_no_client_strings(client: Client) -> None:
    for method in ("PROPFIND", "PURGE", "MKCOL"):
        await client.request(method, "/v2/")
    await client.get("/v2/")
    text = await (await client.get("/metrics")).text()
    methods = {
        line.split('method="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("berth_http_requests_total{")
    }
    assert "GET" in methods and "other" in methods
    assert methods <= {"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"}
