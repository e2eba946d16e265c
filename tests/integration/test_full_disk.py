"""A full volume, on a real small filesystem (a 48 MiB tmpfs this test mounts).

Pushes fill it until refused (507, Retry-After, one log line each and no traceback);
pulls still work; with the volume at zero bytes free, manifest and tag deletes still
commit (the reserve); the collector frees the deleted layers within seconds, not after
the grace period; writes reopen by themselves and a push succeeds, with no restart.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import Registry, Response, blob_file, sha256
from tests.support.processes import RegistryProcess
from tests.support.volumes import fill, free_bytes, tmpfs

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted after the test whatever happens."""
    with tmpfs(tmp_path / "volume", 48) as mount:
        yield mount


def push_image(api: Registry, repo: str, tag: str, layer: bytes) -> Response:
    """Config, one layer, manifest; the first response that is not a success."""
    config = f'{{"tag":"{tag}"}}'.encode()
    for blob in (config, layer):
        response = api.request("POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(blob)}", blob)
        if response.status != 201:
            return response
    manifest = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.oci.image.config.v1+json",'
        f'"digest":"{sha256(config)}","size":{len(config)}}},'
        f'"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar",'
        f'"digest":"{sha256(layer)}","size":{len(layer)}}}]}}'
    ).encode()
    return api.put_manifest(repo, tag, manifest)


def metric(api: Registry, name: str) -> float:
    text = api.get("/metrics").body.decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def test_a_full_volume_refuses_pushes_and_recovers_after_deletes(
    small_volume: Path, registry_process: Callable[..., RegistryProcess]
) -> None:
    registry = registry_process(
        "berth",
        config={
            "storage": {"min_free_bytes": 4 * MiB, "reserve_bytes": 2 * MiB},
            # An hourly collector with an hour's grace: only the prompt path can free space.
            "gc": {"interval_seconds": 3600, "grace_seconds": 3600},
        },
        env={"BERTH_STORAGE_ROOT": str(small_volume)},
    )
    api = Registry(registry.url)
    assert (small_volume / "space-reserve").stat().st_size == 2 * MiB

    # Fill the volume with pushes until one is refused.
    pushed: list[tuple[str, bytes]] = []
    refused: Response | None = None
    for i in range(80):
        layer = os.urandom(MiB)
        response = push_image(api, "team/app", f"v{i}", layer)
        if response.status != 201:
            refused = response
            break
        pushed.append((f"v{i}", layer))
    assert refused is not None, "48 MiB never filled up"
    assert len(pushed) >= 20, len(pushed)
    assert refused.status == 507, refused
    error = refused.json()["errors"][0]
    assert error["code"] == "UNKNOWN" and "storage full" in error["message"], refused
    assert refused.header("Retry-After") == "30"

    # Every write is refused the same way, at once; pulls still work.
    refusals = 1
    for method, path in [
        ("POST", "/v2/team/app/blobs/uploads/"),
        ("PUT", "/v2/team/app/manifests/late"),
    ]:
        response = api.request(method, path, b"{}")
        assert response.status == 507 and response.header("Retry-After") == "30", response
        refusals += 1
    tag, layer = pushed[0]
    assert api.manifest("team/app", tag).status == 200
    assert api.blob("team/app", sha256(layer)) == layer
    assert api.get("/readyz").status == 200
    writes = api.get("/readyz/writes")
    assert writes.status == 503 and b"storage full" in writes.body, writes
    assert metric(api, "berth_storage_full") == 1

    # Zero bytes free: deletes must commit all the same (the reserve).
    fill(small_volume / "filler")
    assert free_bytes(small_volume) == 0
    deleted = pushed[:12]
    for tag, _ in deleted:
        digest = api.head(f"/v2/team/app/manifests/{tag}").header("Docker-Content-Digest")
        response = api.request("DELETE", f"/v2/team/app/manifests/{digest}")
        assert response.status == 202, response
    response = api.request("DELETE", f"/v2/team/app/manifests/{pushed[12][0]}")
    assert response.status == 202, response  # a tag delete
    assert api.manifest("team/app", deleted[0][0]).status == 404

    # The collector frees the deleted layers within seconds (not after the hour's grace).
    start = time.monotonic()
    while any(blob_file(small_volume, sha256(layer)).exists() for _, layer in deleted):
        assert time.monotonic() - start < 20, "deleted layers were not collected"
        time.sleep(0.2)
    freed_after = time.monotonic() - start
    assert free_bytes(small_volume) >= 10 * MiB

    # Writes reopen by themselves (reserve made again first); a push succeeds.
    start = time.monotonic()
    while api.get("/readyz/writes").status != 200:
        assert time.monotonic() - start < 15, "writes never reopened"
        time.sleep(0.2)
    assert metric(api, "berth_storage_full") == 0
    assert metric(api, "berth_storage_free_bytes") >= 4 * MiB
    assert (small_volume / "space-reserve").stat().st_size == 2 * MiB
    response = push_image(api, "team/app", "after", os.urandom(MiB))
    assert response.status == 201, response
    # What was not deleted is intact.
    for _, layer in pushed[13:]:
        assert api.blob("team/app", sha256(layer)) == layer
    assert registry.running
    print(f"\npushed {len(pushed)} images; deleted layers freed in {freed_after:.1f}s")

    log = registry.log_path.read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "write refused: storage full" in line]
    assert len(lines) == refusals, lines
