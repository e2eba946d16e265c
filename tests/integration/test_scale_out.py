"""Scale-out: three Berth replicas over one S3 bucket (SeaweedFS) and one PostgreSQL
database, behind nginx balancing round-robin per request, so each request of a flow may
land on another replica. The OCI conformance suite in full (and the v1.1 line's), real
clients, and the replica that holds GC SIGKILLed in the middle of uploads, pushes and GC
rounds: another takes GC over, the cut upload is finished through the others, every tag
then resolves and every blob hashes to its digest. And two such regions replicating to
each other."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_conformance import (
    run_conformance,
    run_legacy_interface,
    run_v1_1_suite,
)
from tests.integration.test_replicas import metric, until
from tests.support.balancer import Balancer
from tests.support.clients import Registry, canonical_json, crane, oras, sha256, skopeo
from tests.support.images import make_oci_index_layout, make_oci_layout, read_json_blob
from tests.support.postgres import PostgresServer
from tests.support.processes import RegistryProcess, free_port
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

    @property
    def url(self) -> str:
        return self.balancer.url


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


@pytest.mark.parametrize("suite", [run_v1_1_suite, run_legacy_interface], ids=["v1.1", "legacy"])
def test_the_older_suites_through_the_balancer(
    scaled_out: ScaledOut, tmp_path: Path, suite: Callable[[Any, Path], None]
) -> None:
    """The v1.1 release line's suite and the current one's v1.1 interface, as on one
    server: their flows (chunked uploads, cross-mounts, referrers, deletes) spread over
    the replicas too."""
    suite(scaled_out, tmp_path)
    spread = scaled_out.balancer.requests_per_upstream()
    assert len(spread) == REPLICAS, spread


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


def _gc_holder(replicas: list[RegistryProcess]) -> RegistryProcess | None:
    """The one live replica elected for GC, or None while there is none; never two."""
    held = [r for r in replicas if r.running and metric(r, "berth_elected", 'task="gc"') == 1]
    assert len(held) <= 1, f"GC is held by {[r.host for r in held]}"
    return held[0] if held else None


def test_the_gc_holder_killed_during_uploads_pushes_and_gc_loses_nothing(
    scaled_out: ScaledOut, postgres_dsn: str, tmp_path: Path
) -> None:
    host = scaled_out.host
    api = Registry(scaled_out.balancer.url)
    victim = until(lambda: _gc_holder(scaled_out.replicas), "a GC holder")
    # An upload begun on the victim itself, a third of its bytes sent before the kill.
    cut = os.urandom(3 << 20)
    location = Registry(victim.url).start_upload("load/cut")
    assert Registry(victim.url).patch(location, cut[: 1 << 20], start=0).status == 202

    # Garbage for a GC round: 40 images, their manifests deleted at once below (80 blobs).
    junk: list[tuple[str, str]] = []  # (repository, blob digest)
    manifests: list[tuple[str, str]] = []
    for i in range(40):
        repo, config, layer = f"junk/app-{i}", canonical_json({"junk": i}), os.urandom(4096)
        digest, _ = api.push_image(repo, "v1", layers=[layer], config=config)
        junk += [(repo, sha256(config)), (repo, sha256(layer))]
        manifests.append((repo, digest))

    images = 24
    layouts = {i: tmp_path / f"image-{i}" for i in range(images)}
    digests = {
        i: make_oci_layout(layouts[i], "v1", layers=2, layer_size=1 << 20) for i in range(images)
    }

    def push(i: int) -> int:
        """Push one image; a push cut by the killed replica is pushed again."""
        for attempt in range(4):
            result = crane("push", layouts[i], f"{host}/load/app-{i}:v1", check=False)
            if result.returncode == 0:
                return attempt
        raise AssertionError(f"app-{i} never pushed: {result.stderr}")

    # One connection for the polls below (a new one per poll is too slow to see a round).
    db = psycopg.connect(postgres_dsn, autocommit=True)

    def junk_left() -> int:
        row = db.execute(
            "SELECT COUNT(*) FROM blobs WHERE digest = ANY(%s)", ([d for _, d in junk],)
        ).fetchone()
        return int((row or (0,))[0])

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(push, i) for i in range(images)]
        for repo, digest in manifests:
            assert api.request("DELETE", f"/v2/{repo}/manifests/{digest}").status == 202
        # Kill once the holder's round has begun collecting it (after the 5 s grace),
        # the pushes under way meanwhile.
        until(lambda: junk_left() < len(junk), "a GC round collecting", poll=0.005)
        victim.kill()  # SIGKILL, as a crashed node would
        print(f"killed: {junk_left()} of {len(junk)} garbage blobs left,")
        print(f"{sum(f.done() for f in futures)} of {images} pushes done")
        retries = [f.result() for f in futures]
    print(f"pushes that had to be repeated: {sum(1 for r in retries if r)}")

    # The cut upload goes on where it stopped, through the replicas left.
    status = api.request("GET", location)
    assert status.status == 204 and status.header("Range") == f"0-{(1 << 20) - 1}", status
    assert api.patch(location, cut[1 << 20 :], start=1 << 20).status == 202
    assert api.finish(location, sha256(cut)).status == 201
    cut_image, _ = api.push_image("load/cut", "v1", layers=[cut])

    # Another replica holds GC and its rounds finish the collection, while every tag stays.
    survivors = [r for r in scaled_out.replicas if r.running]
    heir = until(lambda: _gc_holder(survivors), "another GC holder", timeout=90)
    until(lambda: metric(heir, "berth_gc_rounds_total") > 0, "a round on the new holder")
    until(lambda: junk_left() == 0, "the rest of the garbage collected", timeout=90, poll=0.5)
    db.close()
    assert not any(api.blob_exists(repo, digest) for repo, digest in junk)
    for i in range(images):
        assert crane("digest", f"{host}/load/app-{i}:v1").stdout.strip() == digests[i]
        manifest = read_json_blob(layouts[i], digests[i])
        for layer in [manifest["config"], *manifest["layers"]]:
            url = f"http://{host}/v2/load/app-{i}/blobs/{layer['digest']}"
            assert _blob_digest(url) == layer["digest"]
    assert sha256(api.manifest("load/cut", "v1").body) == cut_image
    assert _blob_digest(f"http://{host}/v2/load/cut/blobs/{sha256(cut)}") == sha256(cut)


def test_two_scaled_out_regions_replicate_to_each_other(
    registry_process: Callable[..., RegistryProcess],
    s3_store: S3Store,
    postgres: PostgresServer,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    """Regions eu and us, each two replicas on its own prefix of the bucket and its own
    database behind its own balancer, each the other's peer (through that balancer)."""
    dsns = {"eu": postgres_dsn, "us": postgres.create_database()}
    ports = {"eu": free_port(), "us": free_port()}
    regions: dict[str, ScaledOut] = {}
    try:
        for name, peer in (("eu", "us"), ("us", "eu")):
            config: dict[str, Any] = {
                "storage": s3_store.server_config(s3_store.new_prefix(name)),
                "metadata": {"driver": "postgresql", "postgresql": {"dsn": dsns[name]}},
                "gc": {"interval_seconds": 2, "grace_seconds": 5},
                "replication": {
                    "region": name,
                    "retry_max_seconds": 1,
                    "peers": [{"name": peer, "url": f"http://127.0.0.1:{ports[peer]}"}],
                },
            }
            replicas = [registry_process("berth", config=config) for _ in range(2)]
            balancer = Balancer(
                tmp_path / f"balancer-{name}", [r.host for r in replicas], port=ports[name]
            )
            regions[name] = ScaledOut(replicas, balancer.start())

        # An image pushed by crane into each region is served whole by the other.
        pushed = {}
        for name in regions:
            layout = tmp_path / f"from-{name}"
            pushed[name] = (layout, make_oci_layout(layout, "v1", layers=2, layer_size=2 << 20))
            crane("push", layout, f"{regions[name].host}/team/from-{name}:v1")
        for name, other in (("eu", "us"), ("us", "eu")):
            layout, digest = pushed[name]
            there = regions[other].host
            until(
                lambda d=digest, n=name, h=there: (
                    crane("digest", f"{h}/team/from-{n}:v1", check=False).stdout.strip() == d
                ),
                f"team/from-{name}:v1 in {other}",
                timeout=120,
                poll=0.5,
            )
            manifest = read_json_blob(layout, digest)
            for layer in [manifest["config"], *manifest["layers"]]:
                url = f"http://{there}/v2/team/from-{name}/blobs/{layer['digest']}"
                assert _blob_digest(url) == layer["digest"]

        # One tag pushed in both regions, us last: both end on us's image.
        Registry(regions["eu"].balancer.url).push_image("team/shared", "v1", layers=[b"eu"])
        newest, _ = Registry(regions["us"].balancer.url).push_image(
            "team/shared", "v1", layers=[b"us"]
        )
        for name in regions:
            api = Registry(regions[name].balancer.url)
            until(
                lambda a=api: sha256(a.manifest("team/shared", "v1").body) == newest,
                f"the newest team/shared:v1 in {name}",
                timeout=120,
                poll=0.5,
            )
        # Both replicas of each region took part in serving.
        for region in regions.values():
            served = set(region.balancer.requests_per_upstream()) - {"-"}  # "-": none tried
            assert served == {r.host for r in region.replicas}
    finally:
        for region in regions.values():
            region.balancer.stop()
            for replica in region.replicas:
                replica.stop()
        postgres.drop_database(dsns["us"])
