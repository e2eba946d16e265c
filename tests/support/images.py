"""Tiny OCI images written as an OCI image layout on disk, for clients to push.

`make_oci_layout(path)` writes a single-platform image and returns its manifest
digest; `make_oci_index_layout(path)` writes a multi-platform image (an image index
over one manifest per platform) and returns the index digest. Both add a tag to the
layout's index.json, so several calls can share one layout directory, and the
result can be pushed with e.g. `skopeo copy oci:<path>:<tag> docker://...` or
`oras cp --from-oci-layout <path>:<tag> ...`.

Content is pseudo-random from `seed`: the same seed gives the same digests, and
the default seed (None) makes every image unique.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_LAYOUT_VERSION = "1.0.0"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys: stable bytes, hence stable digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _pseudo_random(seed: str, size: int) -> bytes:
    """`size` bytes derived from `seed` (SHA-256 in counter mode; not for secrets)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _parse_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    result = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        result["variant"] = parts[2]
    return result


class _Layout:
    """Writes blobs into an OCI image layout directory and tags into its index.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        layout_file = path / "oci-layout"
        if not layout_file.exists():
            layout_file.write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))

    def put(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        blob = self.blobs / digest.removeprefix("sha256:")
        if not blob.exists():
            blob.write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        index_file = self.path / "index.json"
        if index_file.exists():
            index = json.loads(index_file.read_text())
        else:
            index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []}
        kept = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
        kept.append(descriptor.to_json(annotations={REF_NAME: tag}))
        index["manifests"] = kept
        index_file.write_text(json.dumps(index, indent=2))

    def layer(self, seed: str, size: int) -> tuple[Descriptor, str]:
        """A gzipped tar with one file of `size` bytes; returns it and its diff ID."""
        payload = _pseudo_random(seed, size)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"data/{hashlib.sha256(seed.encode()).hexdigest()[:12]}")
            info.size = len(payload)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
        tar_bytes = raw.getvalue()
        compressed = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
        return self.put(compressed, MEDIA_TYPE_LAYER), sha256_digest(tar_bytes)

    def image(self, seed: str, platform: str, layers: int, layer_size: int) -> Descriptor:
        """Layers, config and manifest for one platform; returns the manifest."""
        layer_descriptors: list[Descriptor] = []
        diff_ids: list[str] = []
        for number in range(layers):
            descriptor, diff_id = self.layer(f"{seed}/{platform}/layer{number}", layer_size)
            layer_descriptors.append(descriptor)
            diff_ids.append(diff_id)
        config = {
            **_parse_platform(platform),
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "tests/support/images.py"} for _ in diff_ids],
        }
        config_descriptor = self.put(canonical_json(config), MEDIA_TYPE_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config_descriptor.to_json(),
            "layers": [d.to_json() for d in layer_descriptors],
        }
        return self.put(canonical_json(manifest), MEDIA_TYPE_MANIFEST)


def _seed(seed: str | int | None) -> str:
    return os.urandom(16).hex() if seed is None else str(seed)


def make_oci_layout(
    path: Path | str,
    tag: str = "v1",
    layers: int = 1,
    layer_size: int = 1024,
    platform: str | None = None,
    *,
    seed: str | int | None = None,
) -> str:
    """Write a single-platform image into the OCI layout at `path` under `tag`.

    `platform` is "os/arch[/variant]" (default linux/amd64). Returns the manifest
    digest ("sha256:...").
    """
    layout = _Layout(Path(path))
    manifest = layout.image(_seed(seed), platform or DEFAULT_PLATFORM, layers, layer_size)
    layout.tag(manifest, tag)
    return manifest.digest


def make_oci_index_layout(
    path: Path | str,
    tag: str = "v1",
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
    layers: int = 1,
    layer_size: int = 1024,
    *,
    seed: str | int | None = None,
) -> str:
    """Write a multi-platform image (an index over one manifest per platform).

    Returns the index digest; `read_json_blob(path, digest)` lists the child manifests.
    """
    if not platforms:
        raise ValueError("an index needs at least one platform")
    layout = _Layout(Path(path))
    base = _seed(seed)
    children = []
    for platform in platforms:
        manifest = layout.image(base, platform, layers, layer_size)
        children.append(manifest.to_json(platform=_parse_platform(platform)))
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": children}
    descriptor = layout.put(canonical_json(index), MEDIA_TYPE_INDEX)
    layout.tag(descriptor, tag)
    return descriptor.digest


def read_blob(path: Path | str, digest: str) -> bytes:
    """The bytes of a blob in an OCI layout."""
    algorithm, _, hex_digest = digest.partition(":")
    return (Path(path) / "blobs" / algorithm / hex_digest).read_bytes()


def read_json_blob(path: Path | str, digest: str) -> dict[str, Any]:
    """A parsed manifest or index blob from an OCI layout."""
    value: dict[str, Any] = json.loads(read_blob(path, digest))
    return value


def tagged_digest(path: Path | str, tag: str) -> str:
    """The digest that index.json of the layout at `path` gives for `tag`."""
    index = json.loads((Path(path) / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            digest: str = entry["digest"]
            return digest
    raise KeyError(f"tag {tag!r} not in {path}/index.json")
