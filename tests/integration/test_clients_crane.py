"""crane against a real berth process: push, pull, copy (also to and from distribution),
ls, digest, manifest, delete — digests preserved throughout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import OCI_INDEX, Registry, assert_error, crane, sha256, skopeo
from tests.support.images import (
    make_oci_index_layout,
    make_oci_layout,
    read_blob,
    read_json_blob,
    tagged_digest,
)
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


def _blobs(layout: Path, manifest_digest: str) -> list[str]:
    manifest = read_json_blob(layout, manifest_digest)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def test_push_pull_ls_digest_manifest(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    source, pulled = tmp_path / "source", tmp_path / "pulled"
    digest = make_oci_layout(source, "v1", layers=2, layer_size=32 * 1024)
    ref = f"{registry.host}/crane/app"

    pushed = crane("push", source, f"{ref}:v1").stdout.strip()

    assert pushed == f"{ref}@{digest}"
    assert crane("digest", f"{ref}:v1").stdout.strip() == digest
    raw = crane("manifest", f"{ref}:v1").stdout.encode()
    assert sha256(raw) == digest
    assert raw == read_blob(source, digest)
    assert crane("ls", ref).stdout.split() == ["v1"]
    assert crane("catalog", registry.host).stdout.split() == ["crane/app"]

    crane("pull", "--format", "oci", f"{ref}:v1", pulled)

    pulled_digests = [
        m["digest"] for m in json.loads((pulled / "index.json").read_text())["manifests"]
    ]
    assert pulled_digests == [digest]
    for blob in [digest, *_blobs(source, digest)]:
        assert read_blob(pulled, blob) == read_blob(source, blob)
    assert api.tags("crane/app") == ["v1"]


def test_copy_between_repositories_and_delete(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    source = tmp_path / "source"
    digest = make_oci_layout(source, "v1", layers=2)
    first, second = f"{registry.host}/crane/first", f"{registry.host}/crane/second"
    crane("push", source, f"{first}:v1")

    crane("copy", f"{first}:v1", f"{second}:v2")
    crane("tag", f"{second}:v2", "v3")

    assert crane("digest", f"{second}:v2").stdout.strip() == digest
    assert crane("digest", f"{second}:v3").stdout.strip() == digest
    assert crane("ls", second).stdout.split() == ["v2", "v3"]
    for blob in _blobs(source, digest):
        assert api.blob("crane/second", blob) == read_blob(source, blob)

    crane("delete", f"{second}@{digest}")

    failed = crane("manifest", f"{second}@{digest}", check=False)
    assert failed.returncode != 0
    assert "MANIFEST_UNKNOWN" in failed.stderr
    assert_error(api.manifest("crane/second", digest), 404, "MANIFEST_UNKNOWN")
    assert_error(api.manifest("crane/second", "v2"), 404, "MANIFEST_UNKNOWN")
    assert crane("ls", second).stdout.split() == []
    # The source repository is untouched.
    assert crane("digest", f"{first}:v1").stdout.strip() == digest
    assert crane("ls", first).stdout.split() == ["v1"]


def test_copy_index_to_and_from_distribution(registry_process: Start, tmp_path: Path) -> None:
    berth = registry_process("berth")
    distribution = registry_process("distribution")
    source = tmp_path / "source"
    index_digest = make_oci_index_layout(source, "v1", ("linux/amd64", "linux/arm64"), layers=2)
    children = [m["digest"] for m in read_json_blob(source, index_digest)["manifests"]]
    skopeo(
        "copy",
        "--all",
        "--dest-tls-verify=false",
        f"oci:{source}:v1",
        f"docker://{berth.host}/crane/multi:v1",
    )

    # berth -> distribution -> berth (another repository): every digest is kept.
    crane("copy", f"{berth.host}/crane/multi:v1", f"{distribution.host}/mirror/multi:v1")
    crane("copy", f"{distribution.host}/mirror/multi:v1", f"{berth.host}/crane/back:v1")

    for ref in (
        f"{distribution.host}/mirror/multi:v1",
        f"{berth.host}/crane/back:v1",
    ):
        assert crane("digest", ref).stdout.strip() == index_digest
        raw = crane("manifest", ref).stdout.encode()
        assert raw == read_blob(source, index_digest)
    api = Registry(berth.url)
    response = api.manifest("crane/back", "v1")
    assert response.header("Content-Type") == OCI_INDEX
    for child in children:
        assert sha256(api.manifest("crane/back", child).body) == child
        for blob in _blobs(source, child):
            assert api.blob("crane/back", blob) == read_blob(source, blob)
    pulled = tmp_path / "pulled"
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{berth.host}/crane/back:v1",
        f"oci:{pulled}:v1",
    )
    assert tagged_digest(pulled, "v1") == index_digest
