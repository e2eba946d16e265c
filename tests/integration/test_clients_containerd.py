"""containerd's `ctr images pull --plain-http` from a real berth process.

The test starts its own containerd (root, state and socket in a temporary directory, the
CRI plugin off) and pulls with the `native` snapshotter, which works on any file system.
containerd needs root; without it the test is skipped (never in CI, where it runs as root).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import run_tool, sha256, skopeo, wait_for
from tests.support.images import make_oci_index_layout, read_blob, read_json_blob
from tests.support.processes import ManagedProcess, RegistryProcess
from tests.support.tools import in_ci, require_tool

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
"""


@pytest.fixture
def containerd_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        message = "containerd needs root"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    binary = require_tool("containerd")
    require_tool("ctr")
    # A short path: unix socket paths are limited to 108 bytes.
    workdir = tmp_path_factory.mktemp("ctrd")
    socket = workdir / "c.sock"
    config = workdir / "config.toml"
    config.write_text(_CONFIG.format(root=workdir / "root", state=workdir / "state", socket=socket))
    process = ManagedProcess("containerd", [binary, "--config", config], workdir / "containerd.log")
    process.start()
    try:
        wait_for(
            lambda: run_tool("ctr", "-a", socket, "version", check=False).returncode == 0,
            timeout=20,
        )
        yield socket
    finally:
        process.stop()


def test_ctr_pulls_multi_arch_image(
    registry_process: Start, containerd_socket: Path, tmp_path: Path
) -> None:
    registry = registry_process("berth")
    source = tmp_path / "source"
    index_digest = make_oci_index_layout(source, "v1", ("linux/amd64", "linux/arm64"), layers=2)
    children = read_json_blob(source, index_digest)["manifests"]
    ref = f"{registry.host}/ctr/app:v1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{source}:v1", f"docker://{ref}")

    def ctr(*args: str) -> str:
        return run_tool("ctr", "-a", containerd_socket, *args, timeout=60).stdout

    ctr("images", "pull", "--plain-http", "--all-platforms", "--snapshotter", "native", ref)

    listed = [line.split() for line in ctr("images", "ls").splitlines()[1:] if line.strip()]
    assert [(row[0], row[2]) for row in listed] == [(ref, index_digest)]
    content = ctr("content", "ls", "-q").split()
    assert index_digest in content
    for child in children:
        manifest = read_json_blob(source, child["digest"])
        for blob in [child, manifest["config"], *manifest["layers"]]:
            # What containerd stored under each digest hashes to it and equals what we pushed.
            stored = subprocess.run(
                [require_tool("ctr"), "-a", containerd_socket, "content", "get", blob["digest"]],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
            assert sha256(stored) == blob["digest"]
            assert stored == read_blob(source, blob["digest"])
