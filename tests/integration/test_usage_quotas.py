"""Usage and quotas on a real server, pushed to by crane: a push over the quota is refused
with the protocol's DENIED, uploads stop early once a repository is full, concurrent
pushes from two worker processes never pass the quota, and after pushes, deletes and GC
rounds the kept figures equal a recount (`berth-registry check`)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_auth_clients import (
    AuthRegistry,
    Start,
    basic,
    crane_as,
    policy,
    start_auth_registry,
)
from tests.integration.test_index_recovery import berth
from tests.support.images import make_oci_layout

pytestmark = pytest.mark.integration

RULES: list[dict[str, Any]] = [
    {"repository": "team-a/app", "quota": {"storage": "40Ki"}},
    {"repository": "team-a/tagged", "quota": {"tags": 2}},
    {"repository": "team-a/busy", "quota": {"storage": "40Ki"}},
]


def image(tmp_path: Path, name: str) -> tuple[Path, int]:
    """An image of two 8 KiB layers; its layout and the bytes it stores (blobs and
    manifest, each once)."""
    path = tmp_path / name
    make_oci_layout(path, "v1", layers=2, layer_size=8 * 1024, seed=name)
    index = json.loads((path / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    raw = (path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
    manifest = json.loads(raw)
    blobs = [manifest["config"], *manifest["layers"]]
    return path, len(raw) + sum(int(b["size"]) for b in blobs)


def layers(path: Path) -> list[str]:
    index = json.loads((path / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    return [layer["digest"] for layer in manifest["layers"]]


def usage(registry: AuthRegistry, repo: str, who: str = "root") -> dict[str, Any]:
    resp = registry.api.get(f"/berth/v1/usage?repository={repo}", headers=basic(who))
    assert resp.status == 200, resp
    found: dict[str, Any] = resp.json()
    return found


def listed(registry: AuthRegistry, who: str) -> list[str]:
    resp = registry.api.get("/berth/v1/usage", headers=basic(who))
    assert resp.status == 200, resp
    return [entry["repository"] for entry in resp.json()["repositories"]]


def gauge(registry: AuthRegistry, name: str, repo: str) -> float | None:
    text = registry.api.get("/metrics", headers=basic("root")).body.decode()
    found = re.search(rf'^{name}{{repository="{re.escape(repo)}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.2)


def test_quotas_refuse_growth_and_usage_follows_pushes_deletes_and_gc(
    registry_process: Start, tmp_path: Path
) -> None:
    registry = start_auth_registry(
        registry_process,
        tmp_path,
        policy(RULES),
        {"gc": {"interval_seconds": 1, "grace_seconds": 2}},
    )
    crane = crane_as(registry, tmp_path)
    repo = f"{registry.host}/team-a/app"
    one, one_size = image(tmp_path, "one")
    two, two_size = image(tmp_path, "two")
    three, _ = image(tmp_path, "three")
    crane("push", one, f"{repo}:v1")
    crane("push", two, f"{repo}:v2")
    assert usage(registry, "team-a/app") == {
        "repository": "team-a/app",
        "storage": one_size + two_size,
        "tags": 2,
        "manifests": 2,
        "quota": {"storage": 40 * 1024, "tags": None},
    }
    refused = crane("push", three, f"{repo}:v3", check=False)
    assert refused.returncode != 0
    assert "DENIED" in refused.stderr and "storage quota exceeded" in refused.stderr
    assert "team-a/app" in refused.stderr, refused.stderr
    assert usage(registry, "team-a/app")["storage"] == one_size + two_size
    stored = registry.process.root / "blobs" / "sha256"
    garbage = [stored / b[7:9] / b[7:] / "data" for b in layers(three)]
    assert all(path.exists() for path in garbage)  # uploaded before the manifest's refusal
    # Another tag on what is stored adds nothing: it goes.
    crane("tag", f"{repo}:v1", "again")
    assert usage(registry, "team-a/app")["tags"] == 3

    # A lowered quota: the repository is over it, so uploads stop at once; pulls go on.
    registry.set_policy(policy([{"repository": "team-a/app", "quota": {"storage": "20Ki"}}]))

    def uploads_refused() -> bool:
        resp = registry.api.request("POST", "/v2/team-a/app/blobs/uploads/", headers=basic("root"))
        return resp.status == 403

    wait_for(uploads_refused)
    resp = registry.api.request("POST", "/v2/team-a/app/blobs/uploads/", headers=basic("root"))
    error = resp.json()["errors"][0]
    assert error["code"] == "DENIED" and "storage quota exceeded" in error["message"], error
    crane("pull", f"{repo}:v1", tmp_path / "pulled.tar")

    # Deleting gives the space back; the repository is under its quota again.
    digest = crane("digest", f"{repo}:v2").stdout.strip()
    crane("delete", f"{repo}@{digest}")
    assert usage(registry, "team-a/app") == {
        "repository": "team-a/app",
        "storage": one_size,
        "tags": 2,
        "manifests": 1,
        "quota": {"storage": 20 * 1024, "tags": None},
    }
    assert not uploads_refused()

    # Tag quota: a third tag is refused, moving one is not.
    tagged = f"{registry.host}/team-a/tagged"
    crane("push", one, f"{tagged}:a")
    registry.set_policy(policy(RULES))
    wait_for(lambda: usage(registry, "team-a/tagged")["quota"]["tags"] == 2)
    crane("tag", f"{tagged}:a", "b")
    failed = crane("tag", f"{tagged}:a", "c", check=False)
    assert failed.returncode != 0 and "tag quota exceeded" in failed.stderr, failed.stderr
    crane("push", two, f"{tagged}:b")
    assert usage(registry, "team-a/tagged")["tags"] == 2

    # Who sees what: the catalog's rights.
    assert listed(registry, "root") == ["team-a/app", "team-a/tagged"]
    assert listed(registry, "alice") == ["team-a/app", "team-a/tagged"]
    assert listed(registry, "puller") == []
    denied = registry.api.get("/berth/v1/usage?repository=team-a/app", headers=basic("puller"))
    assert denied.status == 403
    unknown = registry.api.get("/berth/v1/usage?repository=team-a/none", headers=basic("root"))
    assert unknown.status == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    bad = registry.api.get("/berth/v1/usage?repository=../x", headers=basic("root"))
    assert bad.status == 400 and bad.json()["errors"][0]["code"] == "NAME_INVALID"

    # The gauges follow (refreshed in the background).
    wait_for(lambda: gauge(registry, "berth_repository_stored_bytes", "team-a/app") == one_size)
    assert gauge(registry, "berth_repository_quota_bytes", "team-a/app") == 40 * 1024
    assert gauge(registry, "berth_repository_quota_tags", "team-a/tagged") == 2

    # GC takes what the refused push left; the kept figures still equal a recount from
    # scratch.
    wait_for(lambda: not any(path.exists() for path in garbage))
    code, out = berth(registry.process, "check")
    assert code == 0, out
    assert usage(registry, "team-a/app")["storage"] == one_size
    crane("pull", f"{repo}:again", tmp_path / "again.tar")


def test_concurrent_pushes_from_two_workers_never_pass_the_quota(
    registry_process: Start, tmp_path: Path
) -> None:
    registry = start_auth_registry(
        registry_process, tmp_path, policy(RULES), {"http": {"workers": 2}}
    )
    crane = crane_as(registry, tmp_path)
    images = [image(tmp_path, f"busy-{n}") for n in range(6)]
    sizes = {size for _, size in images}
    # Every image stores about 16.5 KiB: two fit in 40 KiB, three do not.
    assert 2 * max(sizes) <= 40 * 1024 < 3 * min(sizes), sizes
    results: list[bool] = []

    def push(path: Path, n: int) -> None:
        done = crane("push", path, f"{registry.host}/team-a/busy:t{n}", check=False)
        assert done.returncode == 0 or "quota exceeded" in done.stderr, done.stderr
        results.append(done.returncode == 0)

    threads = [threading.Thread(target=push, args=(path, n)) for n, (path, _) in enumerate(images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == [False] * 4 + [True] * 2
    found = usage(registry, "team-a/busy")
    assert found["storage"] <= 40 * 1024 and found["tags"] == 2 == found["manifests"]
    code, out = berth(registry.process, "check")
    assert code == 0, out
