"""skopeo against a real berth process: OCI layout -> registry -> OCI layout, digests kept."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    sha256,
    skopeo,
)
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


def _raw_manifest(ref: str) -> bytes:
    return skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout.encode()


def _assert_served(api: Registry, repo: str, digest: str, media_type: str) -> bytes:
    """GET by digest serves bytes hashing to `digest`, with the right headers."""
    response = api.manifest(repo, digest)
    assert response.status == 200, response
    assert sha256(response.body) == digest
    assert response.header("Docker-Content-Digest") == digest
    assert response.header("Content-Type") == media_type
    assert response.header("Content-Length") == str(len(response.body))
    return response.body


def _image_blobs(layout: Path, manifest_digest: str) -> list[str]:
    manifest = read_json_blob(layout, manifest_digest)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def test_image_round_trip(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    source, back = tmp_path / "source", tmp_path / "back"
    digest = make_oci_layout(source, "v1", layers=3, layer_size=64 * 1024)
    remote = f"docker://{registry.host}/skopeo/image:v1"

    skopeo("copy", "--dest-tls-verify=false", f"oci:{source}:v1", remote)

    assert sha256(_raw_manifest(remote)) == digest
    assert _assert_served(api, "skopeo/image", digest, OCI_MANIFEST) == read_blob(source, digest)
    assert api.tags("skopeo/image") == ["v1"]
    for blob in _image_blobs(source, digest):
        assert api.blob("skopeo/image", blob) == read_blob(source, blob)

    skopeo("copy", "--src-tls-verify=false", remote, f"oci:{back}:v1")

    assert tagged_digest(back, "v1") == digest
    for blob in [digest, *_image_blobs(source, digest)]:
        assert read_blob(back, blob) == read_blob(source, blob)


def test_multi_arch_index_round_trip_with_all(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    source, back = tmp_path / "source", tmp_path / "back"
    platforms = ("linux/amd64", "linux/arm64/v8", "linux/s390x")
    index_digest = make_oci_index_layout(source, "v1", platforms, layers=2, layer_size=8192)
    children = [m["digest"] for m in read_json_blob(source, index_digest)["manifests"]]
    assert len(children) == 3
    remote = f"docker://{registry.host}/skopeo/multi:v1"

    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{source}:v1", remote)

    assert sha256(_raw_manifest(remote)) == index_digest
    _assert_served(api, "skopeo/multi", index_digest, OCI_INDEX)
    for child in children:
        assert _assert_served(api, "skopeo/multi", child, OCI_MANIFEST) == read_blob(source, child)
        for blob in _image_blobs(source, child):
            assert api.blob("skopeo/multi", blob) == read_blob(source, blob)

    skopeo("copy", "--all", "--src-tls-verify=false", remote, f"oci:{back}:v1")

    assert tagged_digest(back, "v1") == index_digest
    assert read_blob(back, index_digest) == read_blob(source, index_digest)
    assert [m["digest"] for m in read_json_blob(back, index_digest)["manifests"]] == children
    for child in children:
        for blob in [child, *_image_blobs(source, child)]:
            assert read_blob(back, blob) == read_blob(source, blob)


def test_docker_schema2_list_copied_between_repositories(
    registry_process: Start, tmp_path: Path
) -> None:
    """Docker media types are stored byte for byte too: a registry-to-registry copy keeps them."""
    registry = registry_process("berth")
    api = Registry(registry.url)
    source = tmp_path / "source"
    make_oci_index_layout(source, "v1", ("linux/amd64", "linux/arm64"), layers=1)
    first = f"docker://{registry.host}/skopeo/docker:v1"
    second = f"docker://{registry.host}/skopeo/docker-copy:v1"

    # Converting to Docker schema2 on the way in yields a manifest list of schema2 images.
    skopeo(
        "copy", "--all", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{source}:v1", first
    )
    raw = _raw_manifest(first)
    listing = json.loads(raw)
    assert listing["mediaType"] == DOCKER_LIST
    _assert_served(api, "skopeo/docker", sha256(raw), DOCKER_LIST)
    for child in listing["manifests"]:
        assert child["mediaType"] == DOCKER_MANIFEST
        _assert_served(api, "skopeo/docker", child["digest"], DOCKER_MANIFEST)

    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        first,
        second,
    )

    assert _raw_manifest(second) == raw
    for child in listing["manifests"]:
        _assert_served(api, "skopeo/docker-copy", child["digest"], DOCKER_MANIFEST)
