"""Replication between three real server processes (eu, us, ap), driven by real clients."""

from __future__ import annotations

import functools
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support.images import make_oci_index_layout, make_oci_layout
from tests.support.processes import RegistryProcess, ReservedPort
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass
class Mesh:
    start: Callable[..., RegistryProcess]
    ports: dict[str, ReservedPort]  # held until the region's server starts
    regions: dict[str, RegistryProcess]

    def config(
        self, region: str, peers: list[str], extra_peers: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "replication": {
                "region": region,
                "anti_entropy_interval_seconds": 2,
                "retry_max_seconds": 1,
                "peers": [
                    {"name": p, "url": f"http://127.0.0.1:{self.ports[p].port}"} for p in peers
                ]
                + (extra_peers or []),
            },
            "log": {"level": "info", "format": "text"},
        }

    def launch(
        self, region: str, peers: list[str], extra_peers: list[dict[str, Any]] | None = None
    ) -> RegistryProcess:
        config = self.config(region, peers, extra_peers)
        proc = self.start("berth", port=self.ports[region].release(), config=config)
        self.regions[region] = proc
        return proc


@pytest.fixture
def mesh(registry_process: Callable[..., RegistryProcess]) -> Iterator[Mesh]:
    names = ["eu", "us", "ap", "sa"]
    m = Mesh(registry_process, {n: ReservedPort() for n in names}, {})
    try:
        for region in ("eu", "us", "ap"):
            m.launch(region, [r for r in ("eu", "us", "ap") if r != region])
        yield m
    finally:
        for reserved in m.ports.values():
            reserved.release()


def skopeo_push(
    layout: Path, tag: str, registry: RegistryProcess, ref: str, all_images: bool = False
) -> None:
    cmd = [str(require_tool("skopeo")), "copy", "--dest-tls-verify=false", "--preserve-digests"]
    if all_images:
        cmd.append("--all")
    cmd += [f"oci:{layout}:{tag}", f"docker://{registry.host}/{ref}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def manifest_digest(registry: RegistryProcess, repo: str, ref: str) -> str | None:
    try:
        r = requests.head(
            f"{registry.url}/v2/{repo}/manifests/{ref}",
            headers={"Accept": MANIFEST_ACCEPT},
            timeout=5,
        )
    except requests.RequestException:
        return None
    return r.headers.get("Docker-Content-Digest") if r.status_code == 200 else None


def tags(registry: RegistryProcess, repo: str) -> list[str]:
    r = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=5)
    return sorted(r.json().get("tags") or []) if r.status_code == 200 else []


def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not converged within {timeout}s: {what}")


def everywhere(
    regions: list[RegistryProcess], repo: str, ref: str, digest: str | None, timeout: float = 30.0
) -> None:
    eventually(
        lambda: all(manifest_digest(r, repo, ref) == digest for r in regions),
        timeout,
        f"{repo}:{ref} -> {digest}",
    )


def status(registry: RegistryProcess) -> dict[str, Any]:
    result: dict[str, Any] = requests.get(
        f"{registry.url}/berth/v1/replication/status", timeout=5
    ).json()
    return result


def test_push_in_one_region_is_pullable_everywhere(mesh: Mesh, tmp_path: Path) -> None:
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=200_000)
    skopeo_push(tmp_path / "img", "v1", eu, "team-a/api:v1")
    everywhere([us, ap], "team-a/api", "v1", digest)
    everywhere([us, ap], "team-a/api", digest, digest)
    # Pull it back from another region with a real client, digests preserved.
    out = tmp_path / "pulled"
    subprocess.run(
        [
            str(require_tool("skopeo")),
            "copy",
            "--src-tls-verify=false",
            f"docker://{ap.host}/team-a/api:v1",
            f"oci:{out}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    peers = {p["name"]: p for p in status(eu)["peers"]}
    assert set(peers) == {"us", "ap"}
    eventually(lambda: all(p["queue_depth"] == 0 for p in status(eu)["peers"]))
    assert all(p["delivered"] >= 1 and p["last_error"] is None for p in status(eu)["peers"])


def _attach_signature(tmp_path: Path, registry: RegistryProcess, ref: str) -> None:
    sig = tmp_path / "sig.txt"
    sig.write_text("signed")
    subprocess.run(
        [
            str(require_tool("oras")),
            "attach",
            "--plain-http",
            "--artifact-type",
            "application/vnd.example.signature",
            f"{registry.host}/{ref}",
            f"{sig.name}:text/plain",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_multi_arch_index_and_referrers_replicate(mesh: Mesh, tmp_path: Path) -> None:
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    index_digest = make_oci_index_layout(
        tmp_path / "multi", platforms=("linux/amd64", "linux/arm64")
    )
    skopeo_push(tmp_path / "multi", "v1", eu, "team-a/multi:v1", all_images=True)
    everywhere([us, ap], "team-a/multi", "v1", index_digest)
    children = json.loads(
        requests.get(
            f"{us.url}/v2/team-a/multi/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}, timeout=5
        ).content
    )["manifests"]
    for child in children:
        assert manifest_digest(ap, "team-a/multi", child["digest"]) == child["digest"]
    # A signature attached with oras replicates with its subject.
    _attach_signature(tmp_path, eu, "team-a/multi:v1")

    def referrers(region: RegistryProcess) -> list[dict[str, Any]]:
        r = requests.get(f"{region.url}/v2/team-a/multi/referrers/{index_digest}", timeout=5)
        return list(r.json().get("manifests", []))

    eventually(lambda: len(referrers(us)) == 1 and len(referrers(ap)) == 1, 30, "referrers")
    assert referrers(ap)[0]["artifactType"] == "application/vnd.example.signature"


def _referrers(region: RegistryProcess, repo: str, subject: str) -> list[str]:
    r = requests.get(f"{region.url}/v2/{repo}/referrers/{subject}", timeout=5)
    return [m["digest"] for m in r.json().get("manifests", [])]


def test_deleted_referrer_does_not_come_back_from_a_region_that_was_away(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A referrer has no tag to carry its delete: a region that was away while it was
    deleted holds an older copy, which anti-entropy must not push back; it gets the
    delete instead, from any region that has it (here not the one it was made in)."""
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    subject = make_oci_layout(tmp_path / "img")
    skopeo_push(tmp_path / "img", "v1", eu, "team-a/signed:v1")
    _attach_signature(tmp_path, eu, "team-a/signed:v1")
    eventually(
        lambda: all(len(_referrers(r, "team-a/signed", subject)) == 1 for r in (us, ap)),
        30,
        "signature everywhere",
    )
    (signature,) = _referrers(eu, "team-a/signed", subject)
    ap.stop()
    assert (
        requests.delete(f"{eu.url}/v2/team-a/signed/manifests/{signature}", timeout=5).status_code
        == 202
    )
    eventually(lambda: _referrers(us, "team-a/signed", subject) == [], 30, "deleted in us")
    eu.stop()  # the region that made the delete cannot tell ap
    ap.start()
    # us tells ap (anti-entropy), and ap's older copy never reaches us meanwhile.
    deadline = time.monotonic() + 30
    while _referrers(ap, "team-a/signed", subject):
        assert _referrers(us, "team-a/signed", subject) == [], "brought back to us"
        assert time.monotonic() < deadline, "the delete did not reach ap"
        time.sleep(0.1)
    eu.start()
    time.sleep(6)  # three anti-entropy rounds
    for region in (eu, us, ap):
        assert _referrers(region, "team-a/signed", subject) == []
        assert manifest_digest(region, "team-a/signed", "v1") == subject


def test_delete_replicates(mesh: Mesh, tmp_path: Path) -> None:
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    digest = make_oci_layout(tmp_path / "img")
    skopeo_push(tmp_path / "img", "v1", eu, "team-a/del:v1")
    skopeo_push(tmp_path / "img", "v1", eu, "team-a/del:keep")
    everywhere([us, ap], "team-a/del", "keep", digest)
    # Delete the tag in another region than the one that pushed it.
    assert requests.delete(f"{us.url}/v2/team-a/del/manifests/v1", timeout=5).status_code == 202
    everywhere([eu, ap], "team-a/del", "v1", None)
    assert tags(ap, "team-a/del") == ["keep"]
    # Deleting the manifest by digest removes it and its remaining tags everywhere.
    assert (
        requests.delete(f"{ap.url}/v2/team-a/del/manifests/{digest}", timeout=5).status_code == 202
    )
    everywhere([eu, us], "team-a/del", digest, None)
    eventually(lambda: tags(eu, "team-a/del") == [] and tags(us, "team-a/del") == [])


def test_concurrent_pushes_of_one_tag_converge(mesh: Mesh, tmp_path: Path) -> None:
    regions = [mesh.regions[r] for r in ("eu", "us", "ap")]
    for round_no in range(3):
        digests = {}
        threads = []
        for region in regions[:2]:
            layout = tmp_path / f"r{round_no}-{region.port}"
            digests[region.port] = make_oci_layout(layout)
            threads.append(
                threading.Thread(
                    target=skopeo_push, args=(layout, "v1", region, "team-a/race:latest")
                )
            )
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        candidates = frozenset(digests.values())
        eventually(functools.partial(_one_of, regions, candidates), 30, f"round {round_no}")


def _one_of(regions: list[RegistryProcess], candidates: frozenset[str]) -> bool:
    """Every region reports the same digest for the raced tag, and it is one of the pushes."""
    seen = {manifest_digest(r, "team-a/race", "latest") for r in regions}
    return len(seen) == 1 and seen.pop() in candidates


def test_sigkill_mid_replication_loses_nothing(mesh: Mesh, tmp_path: Path) -> None:
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    pushed = {}
    for i in range(12):
        layout = tmp_path / f"img{i}"
        pushed[f"v{i}"] = make_oci_layout(layout, layers=2, layer_size=300_000)
        skopeo_push(layout, "v1", eu, f"team-a/crash:v{i}")
        if i == 5:
            us.kill()  # a receiver dies mid-stream
    eu.kill()  # and the sender dies with its log partly delivered
    eu.start()
    us.start()
    for tag, digest in pushed.items():
        everywhere([eu, us, ap], "team-a/crash", tag, digest, timeout=60)


def test_region_away_catches_up_by_anti_entropy(mesh: Mesh, tmp_path: Path) -> None:
    eu, us, ap = (mesh.regions[r] for r in ("eu", "us", "ap"))
    digest = make_oci_layout(tmp_path / "a")
    skopeo_push(tmp_path / "a", "v1", eu, "team-a/away:old")
    everywhere([us, ap], "team-a/away", "old", digest)
    ap.stop()
    new = make_oci_layout(tmp_path / "b")
    skopeo_push(tmp_path / "b", "v1", eu, "team-a/away:new")
    assert requests.delete(f"{us.url}/v2/team-a/away/manifests/old", timeout=5).status_code == 202
    time.sleep(2)
    ap.start()
    everywhere([ap], "team-a/away", "new", new, timeout=60)
    everywhere([ap], "team-a/away", "old", None, timeout=60)


def test_fresh_region_is_backfilled(mesh: Mesh, tmp_path: Path) -> None:
    eu = mesh.regions["eu"]
    pushed = {}
    for i in range(3):
        pushed[f"v{i}"] = make_oci_layout(tmp_path / f"img{i}")
        skopeo_push(tmp_path / f"img{i}", "v1", eu, f"team-b/app{i}:v{i}")
    sa = mesh.launch("sa", ["eu"])
    # eu learns about the new region (as after an operator config change) and restarts.
    eu.config_path.write_text(yaml.safe_dump(mesh.config("eu", ["us", "ap", "sa"])))
    eu.restart()
    for i, (tag, digest) in enumerate(pushed.items()):
        everywhere([sa], f"team-b/app{i}", tag, digest, timeout=60)


def test_one_way_peer_running_distribution(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    dist = registry_process("distribution")
    eu = registry_process(
        "berth",
        config={
            "replication": {
                "region": "eu",
                "anti_entropy_interval_seconds": 2,
                "retry_max_seconds": 1,
                "peers": [{"name": "dist", "kind": "oci", "url": dist.url}],
            }
        },
    )
    single = make_oci_layout(tmp_path / "one", layers=2, layer_size=100_000)
    skopeo_push(tmp_path / "one", "v1", eu, "mirror/single:v1")
    multi = make_oci_index_layout(tmp_path / "multi")
    skopeo_push(tmp_path / "multi", "v1", eu, "mirror/multi:v1", all_images=True)
    everywhere([dist], "mirror/single", "v1", single)
    everywhere([dist], "mirror/multi", "v1", multi)
    out = tmp_path / "back"
    subprocess.run(
        [
            str(require_tool("skopeo")),
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://{dist.host}/mirror/multi:v1",
            f"oci:{out}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == multi
