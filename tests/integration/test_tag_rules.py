"""Immutable tags and retention, enforced by a real server and seen through real clients."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.test_auth_clients import (
    Start,
    basic,
    crane_as,
    policy,
    start_auth_registry,
)
from tests.support.images import make_oci_layout, read_json_blob

pytestmark = pytest.mark.integration

RULES = [
    {
        "repository": "team-a/app",
        "immutable_tags": ["v*"],
        "retention": {"keep_last": 2, "protect": ["stable"]},
    }
]


def test_immutable_tags_refuse_overwrite_and_delete_and_retention_prunes(
    registry_process: Start, tmp_path: Path
) -> None:
    registry = start_auth_registry(
        registry_process,
        tmp_path,
        policy(RULES),
        {"gc": {"interval_seconds": 1, "grace_seconds": 3}},
    )
    crane = crane_as(registry, tmp_path)
    repo = f"{registry.host}/team-a/app"

    layouts: dict[str, Path] = {}

    def push(tag: str) -> str:
        source = layouts[tag] = tmp_path / f"layout-{tag}-{time.monotonic_ns()}"
        digest = make_oci_layout(source, tag)
        crane("push", source, f"{repo}:{tag}")
        return digest

    original = tmp_path / "v1"
    v1 = make_oci_layout(original, "v1")
    crane("push", original, f"{repo}:v1")
    # Pushing the same content again is a no-op, not an overwrite.
    crane("push", original, f"{repo}:v1")
    source = tmp_path / "other"
    make_oci_layout(source, "v1", seed="other")
    refused = crane("push", source, f"{repo}:v1", check=False)
    assert refused.returncode != 0
    assert "tag is immutable" in refused.stderr
    assert crane("digest", f"{repo}:v1").stdout.strip() == v1
    # Not even an admin deletes it, by tag or by digest.
    for reference in (f"{repo}:v1", f"{repo}@{v1}"):
        failed = crane("delete", reference, check=False)
        assert failed.returncode != 0
        assert "tag is immutable" in failed.stderr
    # Other tags move freely.
    push("latest")
    push("latest")

    stable = push("stable")
    dev = [push(f"dev-{i}") for i in range(4)]
    # Read from the pushed layout: retention (every second) may already have removed dev-0.
    first_layer = read_json_blob(layouts["dev-0"], dev[0])["layers"][0]["digest"]
    expected = {"v1", "stable", "dev-2", "dev-3"}  # latest and the older dev tags go
    deadline = time.monotonic() + 30
    while set(crane("ls", repo).stdout.split()) != expected:
        assert time.monotonic() < deadline, crane("ls", repo).stdout
        time.sleep(0.3)
    # The manifests retention untagged are gone as well, the kept ones still serve.
    for digest in dev[:2]:
        assert crane("manifest", f"{repo}@{digest}", check=False).returncode != 0
    assert crane("digest", f"{repo}:stable").stdout.strip() == stable
    assert crane("digest", f"{repo}:dev-3").stdout.strip() == dev[3]
    assert crane("digest", f"{repo}:v1").stdout.strip() == v1
    # And the collector frees their layers (after the 3 s grace), as nothing references them now.
    blob = f"/v2/team-a/app/blobs/{first_layer}"
    while (status := registry.api.request("HEAD", blob, headers=basic("root")).status) == 200:
        assert time.monotonic() < deadline + 30, "the layer of a removed image was not collected"
        time.sleep(0.3)
    assert status == 404
