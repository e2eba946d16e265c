"""Berth servers storing blobs in a real S3-compatible store (SeaweedFS, `s3_store`).

Through HTTP, as clients see it: a chunked upload of 72 MiB in uneven PATCHes with the
server's memory bounded, an upload started on one server and finished on another (one
bucket, one index), blob GET redirected to a pre-signed URL, and skopeo round-tripping
an image, and the OCI conformance suite in full.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.integration.test_conformance import run_conformance
from tests.support.clients import (
    Registry,
    digest_of_chunks,
    pattern_chunks,
    peak_rss_bytes,
    sha256,
    skopeo,
    wait_for,
)
from tests.support.images import make_oci_layout, read_json_blob, tagged_digest
from tests.support.processes import RegistryProcess
from tests.support.s3_store import S3Store
from tests.support.tcp_forward import TcpForward

pytestmark = pytest.mark.integration

MiB = 1 << 20
Start = Callable[..., RegistryProcess]


def _config(s3_store: S3Store, prefix: str, **s3: object) -> dict[str, Any]:
    return {"storage": s3_store.server_config(prefix, **s3), "gc": {"interval_seconds": 0}}


def _slices(chunks: Iterator[bytes], sizes: Iterator[int]) -> Iterator[bytes]:
    """Re-cut a stream into pieces of the given sizes (the last one may be shorter)."""
    pending = b""
    for size in sizes:
        while len(pending) < size:
            more = next(chunks, None)
            if more is None:
                break
            pending += more
        if not pending:
            return
        yield pending[:size]
        pending = pending[size:]


def _uneven_sizes() -> Iterator[int]:
    while True:
        yield from (3 * MiB + 1, 11 * MiB + 5, 700 * 1024, 1, 8 * MiB, 13 * MiB - 3)


def _streamed_digest(url: str) -> tuple[str, int]:
    """GET a blob, hashing it as it arrives."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        assert response.status == 200, response.status
        hasher, size = hashlib.sha256(), 0
        while chunk := response.read(MiB):
            hasher.update(chunk)
            size += len(chunk)
        return "sha256:" + hasher.hexdigest(), size
    finally:
        conn.close()


def test_chunked_upload_in_uneven_patches_keeps_memory_bounded(
    registry_process: Start, s3_store: S3Store
) -> None:
    prefix = s3_store.new_prefix()
    registry = registry_process("berth", config=_config(s3_store, prefix))
    api = Registry(registry.url, timeout=120)
    pid = registry.process.pid
    assert pid is not None
    api.push_blob("warm/up", b"loads the S3 client and its service model")
    before = peak_rss_bytes(pid)

    total, seed = 72 * MiB, 12
    digest = digest_of_chunks(pattern_chunks(total, MiB, seed))
    location = api.start_upload("big/blob")
    offset = 0
    for piece in _slices(pattern_chunks(total, MiB, seed), _uneven_sizes()):
        response = api.patch(location, piece, start=offset)
        assert response.status == 202, response
        offset += len(piece)
        assert response.header("Range") == f"0-{offset - 1}"
    assert offset == total
    response = api.finish(location, digest)
    assert response.status == 201, response

    assert _streamed_digest(f"{registry.url}/v2/big/blob/blobs/{digest}") == (digest, total)
    growth = peak_rss_bytes(pid) - before
    # Parts of 8 MiB: the one filling, the one being sent, their joins and the client's
    # buffers (measured: 32 MiB over the 71 MiB after start-up), never the blob (72 MiB).
    assert growth < 48 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB for a 72 MiB blob"
    keys = s3_store.keys(prefix)
    blob_key = f"blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
    assert blob_key in keys
    assert not [k for k in keys if k.startswith("uploads/")], keys  # the session is gone


def test_an_upload_moves_to_another_server(
    registry_process: Start, s3_store: S3Store, tmp_path: Path
) -> None:
    """Two servers on one bucket and one index (the same SQLite file: one machine, as
    workers share it): the first takes the POST and a PATCH, the second the next PATCH
    and the PUT, with nothing of the first's memory (writer, running hash)."""
    prefix = s3_store.new_prefix()
    shared = {"BERTH_STORAGE_ROOT": str(tmp_path / "shared")}
    first = registry_process("berth", config=_config(s3_store, prefix), env=shared)
    second = registry_process("berth", config=_config(s3_store, prefix), env=shared)
    one, two = Registry(first.url, timeout=120), Registry(second.url, timeout=120)
    data = b"".join(pattern_chunks(21 * MiB + 99, MiB, seed=13))
    digest = sha256(data)
    cut = 9 * MiB + 17  # a full part and a partial one: the second continues that one

    location = one.start_upload("moved/blob")
    assert one.patch(location, data[:cut], start=0).status == 202
    status = two.get(location)
    assert status.status == 204 and status.header("Range") == f"0-{cut - 1}", status
    response = two.patch(location, data[cut:], start=cut)
    assert response.status == 202 and response.header("Range") == f"0-{len(data) - 1}"
    assert two.finish(location, digest).status == 201

    assert one.blob("moved/blob", digest) == data
    assert two.blob("moved/blob", digest) == data
    assert not [k for k in s3_store.keys(prefix) if k.startswith("uploads/")]


def test_blob_get_redirects_to_a_pre_signed_url(registry_process: Start, s3_store: S3Store) -> None:
    prefix = s3_store.new_prefix()
    registry = registry_process("berth", config=_config(s3_store, prefix, redirect=True))
    api = Registry(registry.url)
    data = b"".join(pattern_chunks(3 * MiB + 5, MiB, seed=14))
    digest = api.push_blob("redirected/blob", data)

    response = api.get(f"/v2/redirected/blob/blobs/{digest}")
    assert response.status == 307, response
    assert response.header("Docker-Content-Digest") == digest
    location = response.header("Location")
    assert location and location.startswith(s3_store.endpoint), location
    with urllib.request.urlopen(location, timeout=30) as fetched:
        assert fetched.read() == data
    ranged = urllib.request.Request(location, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(ranged, timeout=30) as fetched:
        assert fetched.status == 206 and fetched.read() == data[100:200]

    head = api.head(f"/v2/redirected/blob/blobs/{digest}")  # HEAD stays here
    assert head.status == 200 and head.header("Content-Length") == str(len(data))
    assert head.header("Location") is None
    missing = api.get(f"/v2/redirected/blob/blobs/sha256:{'0' * 64}")
    assert missing.status == 404  # visibility is the index's, before any redirect


def test_readiness_follows_the_store(registry_process: Start, s3_store: S3Store) -> None:
    """/readyz asks the store too: with keys the store refuses the replica stays out of
    its Service (and says why), while /healthz keeps the kubelet from restarting it."""
    good = registry_process("berth", config=_config(s3_store, s3_store.new_prefix()))
    assert Registry(good.url).get("/readyz").status == 200
    refused = registry_process(
        "berth", config=_config(s3_store, s3_store.new_prefix(), secret_key="not-the-key")
    )
    api = Registry(refused.url)
    ready = api.get("/readyz")
    assert ready.status == 503 and ready.body.startswith(b"blob store unavailable:"), ready
    assert api.get("/healthz").status == 200
    assert api.get("/readyz").status == 503
    # The log says why, once (not at every probe), with the store's own error.
    said = [line for line in refused.log_tail(200).splitlines() if '"not ready"' in line]
    assert len(said) == 1 and "(403)" in said[0], said


@pytest.mark.parametrize("redirect", [False, True], ids=["streamed", "redirected"])
def test_skopeo_round_trip(
    registry_process: Start, s3_store: S3Store, tmp_path: Path, redirect: bool
) -> None:
    prefix = s3_store.new_prefix()
    registry = registry_process("berth", config=_config(s3_store, prefix, redirect=redirect))
    source, back = tmp_path / "source", tmp_path / "back"
    # Layers of several parts each, so pushes compose segments server-side.
    digest = make_oci_layout(source, "v1", layers=2, layer_size=9 * MiB + 7)
    remote = f"docker://{registry.host}/skopeo/on-s3:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{source}:v1", remote)
    skopeo("copy", "--src-tls-verify=false", remote, f"oci:{back}:v1")

    assert tagged_digest(back, "v1") == digest
    manifest = read_json_blob(back, digest)
    for layer in [manifest["config"], *manifest["layers"]]:
        blob = back / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        assert sha256(blob.read_bytes()) == layer["digest"]
        assert blob.stat().st_size == layer["size"]
    index = json.loads((back / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    metrics = Registry(registry.url).get("/metrics").body.decode()
    redirected = 'berth_http_requests_total{method="GET",status="307"}' in metrics
    assert redirected == redirect  # skopeo followed them to the store


def test_oci_conformance_on_s3(registry_process: Start, s3_store: S3Store, tmp_path: Path) -> None:
    """Every category of the official suite, blobs in the object store."""
    registry = registry_process("berth", config=_config(s3_store, s3_store.new_prefix()))
    run_conformance(registry, tmp_path)


def test_an_unreachable_store_answers_503_and_serving_resumes(
    registry_process: Start, s3_store: S3Store, tmp_path: Path
) -> None:
    """The store cut off (through a forwarder that stops): blob requests get 503 with
    Retry-After naming the object store, not a 500 with a traceback; /readyz says so;
    once the store is back the same requests are served."""
    front = TcpForward(("127.0.0.1", s3_store.port)).start()
    try:
        config = _config(s3_store, s3_store.new_prefix(), endpoint=f"http://{front.host}")
        registry = registry_process("berth", config=config)
        api = Registry(registry.url)
        layer = os.urandom(1 << 20)
        api.push_image("team/app", "v1", layers=[layer])

        front.stop()
        cut = api.get(f"/v2/team/app/blobs/{sha256(layer)}")
        assert cut.status == 503 and cut.header("Retry-After"), cut
        assert "object store" in cut.json()["errors"][0]["message"], cut
        pushed = api.request("POST", "/v2/team/app/blobs/uploads/")
        assert pushed.status == 503, pushed
        assert api.get("/readyz").status == 503
        assert "Traceback" not in registry.log_tail(200)

        front.start()
        wait_for(lambda: api.get("/readyz").status == 200, timeout=30)
        assert api.blob("team/app", sha256(layer)) == layer
        api.push_image("team/app", "v2", layers=[os.urandom(1024)])
    finally:
        front.stop()


def test_gc_counts_each_collected_blob_once_on_the_store(
    registry_process: Start, s3_store: S3Store
) -> None:
    """The folders SeaweedFS keeps where blobs were deleted are listed like blobs: GC
    rounds must not take them for orphans, round after round (the counters grew by every
    blob ever deleted, each round)."""
    config = {
        **_config(s3_store, s3_store.new_prefix()),
        "gc": {"interval_seconds": 1, "grace_seconds": 0},
    }
    registry = registry_process("berth", config=config)
    api = Registry(registry.url)
    digest, _ = api.push_image("team/app", "v1", layers=[os.urandom(4096)])
    assert api.request("DELETE", f"/v2/team/app/manifests/{digest}").status == 202

    def sample(name: str) -> float:
        for line in api.get("/metrics").body.decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return 0.0

    wait_for(lambda: sample("berth_gc_blobs_deleted_total") >= 2, timeout=30)
    collected, rounds = sample("berth_gc_blobs_deleted_total"), sample("berth_gc_rounds_total")
    wait_for(lambda: sample("berth_gc_rounds_total") >= rounds + 3, timeout=30)
    assert sample("berth_gc_blobs_deleted_total") == collected == 2


def test_a_blob_missing_from_the_store_is_blob_unknown(
    registry_process: Start, s3_store: S3Store
) -> None:
    """Recorded in the index but gone from the bucket (a lifecycle rule, a hand): a 404
    BLOB_UNKNOWN as on a volume, not a 500 with a traceback (found by review)."""
    prefix = s3_store.new_prefix()
    registry = registry_process("berth", config=_config(s3_store, prefix))
    api = Registry(registry.url)
    digest = api.push_blob("gone/blob", b"".join(pattern_chunks(MiB, MiB, seed=15)))
    keys = [k for k in s3_store.keys(prefix) if digest.removeprefix("sha256:") in k]
    assert keys, s3_store.keys(prefix)
    client = s3_store.client()
    for key in keys:
        client.delete_object(Bucket=s3_store.bucket, Key=f"{prefix}/{key}")
    response = api.get(f"/v2/gone/blob/blobs/{digest}")
    assert response.status == 404, response
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
