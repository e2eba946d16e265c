"""A referrer a peer sends by digest, against a delete of it here: through the application
(headers, the manifest service, the index and the replication state it reports)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from registry_server.app import build_app
from registry_server.config import Config, StorageConfig
from registry_server.protocol import digests, manifests, versions

Client = TestClient[Any, Any]
CONFIG = b"{}"
OCI = "application/vnd.oci.image.manifest.v1+json"


def _manifest(subject: tuple[str, int] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI,
        "config": {
            "mediaType": manifests.OCI_EMPTY_CONFIG,
            "digest": str(digests.of_bytes(CONFIG)),
            "size": len(CONFIG),
        },
        "layers": [],
    }
    if subject is not None:
        doc["artifactType"] = "application/vnd.example.signature"
        doc["subject"] = {"mediaType": OCI, "digest": subject[0], "size": subject[1]}
    return json.dumps(doc).encode()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    app = build_app(Config(storage=StorageConfig(root=tmp_path)))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def _put(client: Client, reference: str, body: bytes, headers: dict[str, str]) -> int:
    reply = await client.put(
        f"/v2/r/manifests/{reference}", data=body, headers={"Content-Type": OCI, **headers}
    )
    return reply.status


async def test_a_peer_copy_of_a_referrer_deleted_since_is_not_taken_back(client: Client) -> None:
    reply = await client.post(
        f"/v2/r/blobs/uploads/?digest={digests.of_bytes(CONFIG)}", data=CONFIG
    )
    assert reply.status == 201
    image = _manifest()
    assert await _put(client, "v1", image, {}) == 201
    signature = _manifest((str(digests.of_bytes(image)), len(image)))
    sig = str(digests.of_bytes(signature))
    assert await _put(client, sig, signature, {}) == 201
    state = await (await client.get("/berth/v1/replication/state?repository=r")).json()
    assert state["referrers"] == [sig] and state["deleted_referrers"] == []
    pushed = state["referrers_stored"][sig]
    assert (await client.delete(f"/v2/r/manifests/{sig}")).status == 202

    state = await (await client.get("/berth/v1/replication/state?repository=r")).json()
    assert state["referrers"] == [] and state["referrers_stored"] == {}
    (deleted,) = state["deleted_referrers"]
    assert deleted["digest"] == sig and deleted["version"] > pushed

    # A peer's copy stored before the delete, or one whose peer does not say when:
    # answered as taken (the delete reaches that peer too), not stored.
    for headers in (
        {versions.REPLICATED_HEADER: "1", versions.STORED_VERSION_HEADER: str(pushed)},
        {versions.REPLICATED_HEADER: "1"},
    ):
        assert await _put(client, sig, signature, headers) == 201
        assert (await client.head(f"/v2/r/manifests/{sig}")).status == 404
    # A copy stored after the delete (pushed there again) is taken, with its version.
    later = deleted["version"] + 1
    new = {versions.REPLICATED_HEADER: "1", versions.STORED_VERSION_HEADER: str(later)}
    assert await _put(client, sig, signature, new) == 201
    assert (await client.head(f"/v2/r/manifests/{sig}")).status == 200
    state = await (await client.get("/berth/v1/replication/state?repository=r")).json()
    assert state["referrers"] == [sig] and state["deleted_referrers"] == []
    assert state["referrers_stored"] == {sig: later}


@pytest.mark.parametrize("value", ["", "-1", "1.5", "\u0661", str(1 << 63), "1e3"])
async def test_a_stored_version_header_that_is_not_a_version_is_400(
    client: Client, value: str
) -> None:
    headers = {versions.REPLICATED_HEADER: "1", versions.STORED_VERSION_HEADER: value}
    reply = await client.put(
        "/v2/r/manifests/v1", data=_manifest(), headers={"Content-Type": OCI, **headers}
    )
    assert reply.status == 400
    assert (await reply.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_a_stored_version_far_ahead_of_this_clock_is_refused(client: Client) -> None:
    ahead = versions.tick(0, int((time.time() + 3600) * 1000))
    headers = {versions.REPLICATED_HEADER: "1", versions.STORED_VERSION_HEADER: str(ahead)}
    reply = await client.put(
        "/v2/r/manifests/v1", data=_manifest(), headers={"Content-Type": OCI, **headers}
    )
    assert reply.status == 503 and reply.headers["Retry-After"] == "30"
