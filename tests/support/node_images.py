"""Container images for the test node, made here from local binaries.

No public container registry is reachable, so the sandbox (pause) image, CoreDNS and the
workloads the node's pods run are written as OCI image archives (a tar of an OCI image
layout) from files on this machine: `ctr images import` loads them into containerd, and
`skopeo copy oci-archive:...` pushes them to a registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .images import MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER, MEDIA_TYPE_MANIFEST

REF_NAME = "org.opencontainers.image.ref.name"
# containerd's import names the image from this annotation (ref.name holds only the tag).
CONTAINERD_NAME = "io.containerd.image.name"
# Fixed timestamps keep the digests of an image stable from run to run.
EPOCH = 0


@dataclass(frozen=True)
class File:
    """One file of a layer: its path in the image, its content and mode."""

    path: str
    content: bytes
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class ImageSpec:
    """What goes into a one-layer image."""

    name: str  # the full reference, e.g. "berth.local/pause:v1"
    files: Sequence[File | Symlink]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _layer(files: Sequence[File | Symlink]) -> tuple[bytes, str]:
    """A gzip'd layer tar and the digest of the uncompressed tar (the diff id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for entry in files:
            parts = entry.path.strip("/").split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                    tar.addfile(info)
            info = tarfile.TarInfo(entry.path.strip("/"))
            info.mtime = EPOCH
            if isinstance(entry, Symlink):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(entry.content), entry.mode
                tar.addfile(info, io.BytesIO(entry.content))
    uncompressed = raw.getvalue()
    compressed = gzip.compress(uncompressed, compresslevel=1, mtime=EPOCH)
    return compressed, _digest(uncompressed)


def write_archive(spec: ImageSpec, path: Path) -> str:
    """Write `spec` as an OCI image archive at `path`; returns the manifest digest."""
    layer, diff_id = _layer(spec.files)
    config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {
            "Entrypoint": list(spec.entrypoint) or None,
            "Cmd": list(spec.cmd) or None,
            "Env": [f"{k}={v}" for k, v in spec.env.items()]
            or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "User": spec.user,
            "Labels": dict(spec.labels) or None,
        },
    }
    config_bytes = _json(config)
    manifest_bytes = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": _digest(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": MEDIA_TYPE_LAYER, "digest": _digest(layer), "size": len(layer)}
            ],
        }
    )
    manifest_digest = _digest(manifest_bytes)
    tag = spec.name.rpartition(":")[2]
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {REF_NAME: tag, CONTAINERD_NAME: spec.name},
                }
            ],
        }
    )
    blobs = [config_bytes, layer, manifest_bytes]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, mode="w") as tar:
        members = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
        members += [(f"blobs/sha256/{_digest(b)[7:]}", b) for b in blobs]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    partial.replace(path)
    return manifest_digest


def static_binary_image(name: str, binary: Path, *, arguments: Sequence[str] = ()) -> ImageSpec:
    """An image holding one static binary at `/<its name>`, run as its entrypoint."""
    target = f"/{binary.name}"
    return ImageSpec(
        name=name,
        files=[File(target.lstrip("/"), binary.read_bytes())],
        entrypoint=[target, *arguments],
    )


BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "cat",
    "sleep",
    "wget",
    "ls",
    "env",
    "id",
    "nc",
    "nslookup",
    "true",
)


def busybox_image(name: str, busybox: Path, *, message: str = "") -> ImageSpec:
    """Debian's static busybox with a few applets linked, and `/message` holding
    `message`: a workload whose output tells which image a pod runs."""
    files: list[File | Symlink] = [File("bin/busybox", busybox.read_bytes())]
    files += [Symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    files.append(File("message", message.encode(), 0o644))
    return ImageSpec(
        name=name,
        files=files,
        cmd=["/bin/sh", "-c", "cat /message; echo; sleep 3600"],
        env={"PATH": "/bin"},
    )
