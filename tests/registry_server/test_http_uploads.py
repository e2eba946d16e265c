"""Upload sessions through the whole aiohttp app, in process: per-session state is bounded.

The blob store keeps a lock (and a running hash) per upload session in memory. Requests
naming sessions that do not exist, and sessions that end, must leave nothing behind, or
any client could grow the server's memory without bound by inventing upload ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from registry_server.app import build_app
from registry_server.config import Config, HttpConfig, StorageConfig
from registry_server.http.context import SERVICES
from registry_server.storage.blobstore import BlobStore
from tests.support.clients import stalled_request

Client = TestClient[Any, Any]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    app = build_app(Config(storage=StorageConfig(root=tmp_path)))
    async with TestClient(TestServer(app)) as client:
        yield client


def _store(client: Client) -> BlobStore:
    store: BlobStore = client.app[SERVICES].blobs.store
    return store


def _per_session_state(store: BlobStore) -> dict[str, int]:
    return {"locks": len(store._locks), "hashes": len(store._hashes)}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_requests_for_unknown_sessions_leave_no_state(client: Client) -> None:
    store = _store(client)
    for upload_id in [str(uuid.uuid4()) for _ in range(50)] + ["not-a-uuid", "x" * 200]:
        location = f"/v2/repo/blobs/uploads/{upload_id}"
        for method, path, data in [
            ("GET", location, None),
            ("PATCH", location, b"data"),
            ("PUT", f"{location}?digest={_digest(b'data')}", b"data"),
            ("DELETE", location, None),
        ]:
            response = await client.request(method, path, data=data)
            assert response.status == 404, (method, path, await response.text())
            assert (await response.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert _per_session_state(store) == {"locks": 0, "hashes": 0}


async def test_finished_and_cancelled_sessions_leave_no_state(client: Client) -> None:
    store = _store(client)
    data = b"0123456789" * 1000

    started = await client.post("/v2/repo/blobs/uploads/")
    location = started.headers["Location"]
    await client.patch(location, data=data[:5000], headers={"Content-Range": "0-4999"})
    finished = await client.put(f"{location}?digest={_digest(data)}", data=data[5000:])
    assert finished.status == 201, await finished.text()

    started = await client.post("/v2/repo/blobs/uploads/")
    location = started.headers["Location"]
    await client.patch(location, data=data[:5000])
    cancelled = await client.delete(location)
    assert cancelled.status == 204
    assert (await client.delete(location)).status == 404

    single = await client.post(f"/v2/repo/blobs/uploads/?digest={_digest(b'x')}", data=b"x")
    assert single.status == 201
    mismatch = await client.post(f"/v2/repo/blobs/uploads/?digest={_digest(b'y')}", data=b"x")
    assert mismatch.status == 400
    assert _per_session_state(store) == {"locks": 0, "hashes": 0}


async def test_requests_on_one_session_are_still_serialised(client: Client) -> None:
    """Concurrent PATCHes with the same Content-Range: exactly one lands, the others 416."""
    started = await client.post("/v2/repo/blobs/uploads/")
    location = started.headers["Location"]
    chunk = b"a" * 100_000
    responses = await asyncio.gather(
        *(
            client.patch(location, data=chunk, headers={"Content-Range": f"0-{len(chunk) - 1}"})
            for _ in range(8)
        )
    )
    assert sorted(r.status for r in responses) == [202] + [416] * 7
    status = await client.get(location)
    assert status.headers["Range"] == f"0-{len(chunk) - 1}"
    finished = await client.put(f"{location}?digest={_digest(chunk)}")
    assert finished.status == 201
    assert _per_session_state(_store(client)) == {"locks": 0, "hashes": 0}


async def test_hash_states_stay_bounded_across_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two apps on one storage root, as two worker processes are: chunks land on one, the
    final PUT on the other, whose cancel cannot clear the first one's cached hash state."""
    monkeypatch.setattr(BlobStore, "max_cached_hashes", 8)
    config = Config(storage=StorageConfig(root=tmp_path))
    async with (
        TestClient(TestServer(build_app(config))) as first,
        TestClient(TestServer(build_app(config))) as second,
    ):
        for number in range(40):
            data = f"blob {number} ".encode() * 100
            started = await first.post("/v2/repo/blobs/uploads/")
            location = started.headers["Location"]
            patched = await second.patch(location, data=data)
            assert patched.status == 202
            finished = await first.put(f"{location}?digest={_digest(data)}")
            assert finished.status == 201, await finished.text()
            blob = await first.get(f"/v2/repo/blobs/{_digest(data)}")
            assert await blob.read() == data
        assert len(_store(second)._hashes) <= 8
        assert _per_session_state(_store(first)) == {"locks": 0, "hashes": 0}


async def test_a_session_takes_one_request_at_a_time_across_workers(tmp_path: Path) -> None:
    """Two apps on one storage root, as two worker processes are. While one streams the
    closing PUT of a blob the registry already holds, a PATCH on that session lands on
    the other: it waits for the PUT and then finds the session ended. Appending during
    the PUT put other bytes into the data the PUT had hashed as its body, and the mix
    replaced the stored blob under its digest (found by review)."""
    config = Config(storage=StorageConfig(root=tmp_path))
    async with (
        TestClient(TestServer(build_app(config))) as first,
        TestClient(TestServer(build_app(config))) as second,
    ):
        good = bytes(range(256)) * 8192  # 2 MiB
        digest = _digest(good)
        stored = await first.post(f"/v2/team/base/blobs/uploads/?digest={digest}", data=good)
        assert stored.status == 201
        started = await second.post("/v2/other/x/blobs/uploads/")
        location = started.headers["Location"]
        halfway = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield good[: len(good) // 2]
            halfway.set()
            await asyncio.sleep(0.5)
            yield good[len(good) // 2 :]

        async def put() -> int:
            reply = await first.put(
                f"{location}?digest={digest}",
                data=slow_body(),
                headers={"Content-Length": str(len(good))},
            )
            return reply.status

        async def patch() -> int:
            await halfway.wait()
            await asyncio.sleep(0.1)  # the PUT's first half is on the server
            reply = await second.patch(location, data=b"EVIL" * 256)
            return reply.status

        assert await asyncio.gather(put(), patch()) == [201, 404]
        for app in (first, second):
            for repo in ("team/base", "other/x"):
                blob = await app.get(f"/v2/{repo}/blobs/{digest}")
                assert blob.status == 200 and await blob.read() == good


async def test_a_chunked_body_is_stored_whole_and_in_order(client: Client) -> None:
    """Transfer-Encoding: chunked, in HTTP chunks of every size (docker and podman PATCH
    this way): the body is read piece by piece, chunk ends included, and nothing is lost,
    repeated or reordered, in a PATCH and in the closing PUT."""
    sizes = [1, 7, 65_536, 3, 300_000, 1 << 20, 2, (1 << 20) + 1]
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    data = b"".join(pieces)

    async def body(part: list[bytes]) -> AsyncIterator[bytes]:
        for piece in part:
            yield piece

    started = await client.post("/v2/repo/blobs/uploads/")
    assert started.status == 202
    patched = await client.patch(started.headers["Location"], data=body(pieces[:5]))
    assert patched.status == 202, await patched.text()
    assert patched.headers["Range"] == f"0-{sum(sizes[:5]) - 1}"
    location = patched.headers["Location"]
    joiner = "&" if "?" in location else "?"
    done = await client.put(f"{location}{joiner}digest={_digest(data)}", data=body(pieces[5:]))
    assert done.status == 201, await done.text()
    pulled = await client.get(f"/v2/repo/blobs/{_digest(data)}")
    assert pulled.status == 200
    assert await pulled.read() == data


async def test_a_body_gone_silent_is_refused_and_lets_go_of_its_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PATCH whose client stops sending mid-body (a dead network, a laptop asleep, or on
    purpose) is answered BLOB_UPLOAD_INVALID after http.body_idle_timeout_seconds; it held
    the session's lock, and a descriptor, for as long as the connection lived (review)."""
    config = Config(
        storage=StorageConfig(root=tmp_path), http=HttpConfig(body_idle_timeout_seconds=0.5)
    )
    async with TestClient(TestServer(build_app(config))) as client:
        started = await client.post("/v2/repo/blobs/uploads/")
        location = started.headers["Location"]
        status, body = await stalled_request(
            client.host,
            client.port,
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + b"0123456789",
        )
        reply = json.loads(body)
        assert status == 400
        assert reply["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        assert "no body data for 0.5 s" in json.dumps(reply)
        # The session is free, and holds none of the ten bytes.
        async with asyncio.timeout(5):
            state = await client.get(location)
            assert state.status == 204 and state.headers["Range"] == "0-0"
            assert (await client.delete(location)).status == 204
    assert "Unhandled exception" not in caplog.text


async def test_a_chunk_whose_range_and_length_disagree_tells_where_the_session_is(
    client: Client,
) -> None:
    """416, with the session's Location and Range as any 416 of an upload (review)."""
    started = await client.post("/v2/repo/blobs/uploads/")
    location = started.headers["Location"]
    assert (await client.patch(location, data=b"0123456789")).status == 202
    for content_range in ("10-14", "10-9", "ten"):
        refused = await client.patch(
            location, data=b"abc", headers={"Content-Range": content_range}
        )
        assert refused.status == 416, content_range
        assert refused.headers["Range"] == "0-9"
        assert refused.headers["Location"].endswith(location.rsplit("/", 1)[1])
        assert refused.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]


async def test_a_manifest_body_gone_silent_is_a_manifest_error(tmp_path: Path) -> None:
    """Said in the manifest's own terms: it was BLOB_UPLOAD_INVALID, an upload's error."""
    config = Config(
        storage=StorageConfig(root=tmp_path), http=HttpConfig(body_idle_timeout_seconds=0.5)
    )
    async with TestClient(TestServer(build_app(config))) as client:
        status, body = await stalled_request(
            client.host,
            client.port,
            b"PUT /v2/repo/manifests/latest HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n{",
        )
        reply = json.loads(body)
        assert status == 400
        assert reply["errors"][0]["code"] == "MANIFEST_INVALID"
        assert "no body data for 0.5 s" in json.dumps(reply)
