"""Scale-out: three Berth replicas over one S3 bucket (SeaweedFS) and one PostgreSQL
database, behind nginx balancing round-robin per request, so each request of a flow may
land on another replica. The OCI conformance suite in full, real clients, and a replica
SIGKILLed in the middle of pushes and GC rounds: every tag then resolves and every blob
hashes to its digest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_conformance import run_conformance
from tests.support.balancer import Balancer
from tests.support.clients import crane, oras, skopeo
from tests.support.images import make_oci_index_layout, make_oci_layout, read_json_blob
from tests.support.processes import RegistryProcess
from tests.support.s3_store import S3Store

pytestmark = pytest.mark.integration

REPLICAS = 3


@dataclass
class ScaledOut:
    replicas: list[RegistryProcess]
    balancer: Balancer

    @property
    def host(self) -> str:
        return self.balancer.host


@pytest.fixture
def scaled_out(
    registry_process: Callable[..., RegistryProcess],
    s3_store: S3Store,
    postgres_dsn: str,
    tmp_path: Path,
) -> Iterator[ScaledOut]:
    config: dict[str, Any] = {
        "storage": s3_store.server_config(s3_store.new_prefix("scale")),
        "metadata": {"driver": "postgresql", "postgresql": {"dsn": postgres_dsn}},
        # Collection runs all along (on whichever replica holds it), with a short grace.
        "gc": {"interval_seconds": 2, "grace_seconds": 5},
    }
    replicas = [registry_process("berth", config=config) for _ in range(REPLICAS)]
    balancer = Balancer(tmp_path / "balancer", [r.host for r in replicas]).start()
    try:
        yield ScaledOut(replicas, balancer)
    finally:
        balancer.stop()


def test_conformance_in_full_through_a_balancer_over_three_replicas(
    scaled_out: ScaledOut, tmp_path: Path
) -> None:
    run_conformance(scaled_out, tmp_path)  # type: ignore[arg-type]
    spread = scaled_out.balancer.requests_per_upstream()
    print(f"requests per replica: {spread}")
    assert len(spread) == REPLICAS and min(spread.values()) > 100, spread


def test_real_clients_round_trip_through_the_balancer(
    scaled_out: ScaledOut, tmp_path: Path
) -> None:
    host = scaled_out.host
    single = make_oci_layout(tmp_path / "single", "v1", layers=3, layer_size=3 << 20)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'single'}:v1",
        f"docker://{host}/team/single:v1",
    )
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{host}/team/single:v1",
        f"oci:{tmp_path / 'back'}:v1",
    )
    assert read_json_blob(tmp_path / "back", single) == read_json_blob(tmp_path / "single", single)

    index = make_oci_index_layout(tmp_path / "multi", "v1", ["linux/amd64", "linux/arm64"])
    skopeo(
        "copy",
        "--all",
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'multi'}:v1",
        f"docker://{host}/team/multi:v1",
    )
    assert crane("digest", f"{host}/team/multi:v1").stdout.strip() == index

    artifact = tmp_path / "notes.txt"
    artifact.write_text("scale-out\n")
    oras("push", "--plain-http", f"{host}/team/notes:v1", "notes.txt", cwd=tmp_path)
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    oras("pull", "--plain-http", f"{host}/team/notes:v1", cwd=pulled)
    assert (pulled / "notes.txt").read_text() == "scale-out\n"


def _blob_digest(url: str) -> str:
    hasher = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def test_a_replica_killed_during_pushes_and_gc_loses_nothing(
    scaled_out: ScaledOut, tmp_path: Path
) -> None:
    host = scaled_out.host
    images = 12
    layouts = {i: tmp_path / f"image-{i}" for i in range(images)}
    digests = {
        i: make_oci_layout(layouts[i], "v1", layers=2, layer_size=2 << 20) for i in range(images)
    }

    def push(i: int) -> int:
        """Push one image; a push cut by the killed replica is pushed again."""
        for attempt in range(4):
            result = crane("push", layouts[i], f"{host}/load/app-{i}:v1", check=False)
            if result.returncode == 0:
                return attempt
        raise AssertionError(f"app-{i} never pushed: {result.stderr}")

    victim = scaled_out.replicas[1]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(push, i) for i in range(images)]
        # Kill once the pushes are under way (a few done, others in flight).
        concurrent.futures.wait(futures[:3])
        victim.kill()  # SIGKILL, as a crashed node would
        retries = [f.result() for f in futures]
    print(f"pushes that had to be repeated: {sum(1 for r in retries if r)}")

    # Several GC rounds pass (2 s interval, 5 s grace) on the replicas left.
    time.sleep(12)
    for i in range(images):
        assert crane("digest", f"{host}/load/app-{i}:v1").stdout.strip() == digests[i]
        manifest = read_json_blob(layouts[i], digests[i])
        for layer in [manifest["config"], *manifest["layers"]]:
            url = f"http://{host}/v2/load/app-{i}/blobs/{layer['digest']}"
            assert _blob_digest(url) == layer["digest"]
