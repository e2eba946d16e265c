"""containerd's `ctr images pull --plain-http` from a real berth process.

The test starts its own containerd (the `containerd` fixture, tests/support/containerd.py:
root, state and socket in a temporary directory, the CRI plugin off) and pulls with the
`native` snapshotter, which works on any file system. containerd needs root; without it
the test is skipped (never in CI, where it runs as root).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import sha256, skopeo
from tests.support.containerd import Containerd
from tests.support.images import make_oci_index_layout, read_blob, read_json_blob
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


def test_ctr_pulls_multi_arch_image(
    registry_process: Start, containerd: Containerd, tmp_path: Path
) -> None:
    registry = registry_process("berth")
    source = tmp_path / "source"
    index_digest = make_oci_index_layout(source, "v1", ("linux/amd64", "linux/arm64"), layers=2)
    children = read_json_blob(source, index_digest)["manifests"]
    ref = f"{registry.host}/ctr/app:v1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{source}:v1", f"docker://{ref}")

    def ctr(*args: str) -> str:
        return containerd.ctr(*args, timeout=60)

    ctr("images", "pull", "--plain-http", "--all-platforms", "--snapshotter", "native", ref)

    listed = [line.split() for line in ctr("images", "ls").splitlines()[1:] if line.strip()]
    assert [(row[0], row[2]) for row in listed] == [(ref, index_digest)]
    content = ctr("content", "ls", "-q").split()
    assert index_digest in content
    for child in children:
        manifest = read_json_blob(source, child["digest"])
        for blob in [child, manifest["config"], *manifest["layers"]]:
            # What containerd stored under each digest hashes to it and equals what we pushed.
            stored = containerd.content(blob["digest"])
            assert sha256(stored) == blob["digest"]
            assert stored == read_blob(source, blob["digest"])
