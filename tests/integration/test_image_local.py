"""`make image-local`: the Berth image built without Docker, and run by containerd.

The module builds the image with `python -m berth_dev.image build`, the command behind
the make target (cached: a few seconds when nothing changed, minutes from an empty
cache), then checks the archive: its config says what the Dockerfile says (user,
command, ports, labels, environment), its layers hold the user, its home and the venv.
Last it imports the archive into a containerd of its own (the `containerd` fixture of
tests/conftest.py: socket, root and state in a temporary directory, the CRI plugin off;
the native snapshotter) and runs the image with `ctr run`: the server answers /v2/ and
stores an upload as uid 65532.

Building needs root (debootstrap, chroot, mounts) and so does containerd: without root
the module is skipped, and fails in CI, which runs as root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import secrets
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import wait_for
from tests.support.containerd import Containerd
from tests.support.processes import ManagedProcess, free_port
from tests.support.tools import REPO_ROOT, require_root

pytestmark = pytest.mark.integration

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
FINAL_STAGE = DOCKERFILE[DOCKERFILE.rindex("\nFROM ") :]


def _needs_root() -> None:
    require_root(
        "building and running the image needs root (debootstrap, chroot, containerd): "
        "run `sudo make image-local`, then the tests as root"
    )


@dataclass
class Archive:
    path: Path
    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]

    def blob(self, digest: str) -> bytes:
        with tarfile.open(self.path) as tar:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return member.read()

    def layer(self, number: int) -> dict[str, tarfile.TarInfo]:
        """The entries of a layer by name, and checks its digest and diff ID."""
        descriptor = self.manifest["layers"][number]
        data = self.blob(descriptor["digest"])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        assert len(data) == descriptor["size"]
        plain = gzip.decompress(data)
        diff_id = self.config["rootfs"]["diff_ids"][number]
        assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
            return {member.name: member for member in tar.getmembers()}

    def layer_file(self, number: int, name: str) -> bytes:
        data = gzip.decompress(self.blob(self.manifest["layers"][number]["digest"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile(name)
            assert member is not None, name
            return member.read()


@pytest.fixture(scope="module")
def archive() -> Archive:
    _needs_root()
    built = subprocess.run(
        [sys.executable, "-m", "berth_dev.image", "build"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert built.returncode == 0, f"image build failed:\n{built.stderr[-4000:]}"
    # The interface the node fixture relies on: the archive's path is the last line.
    path = Path(built.stdout.strip().splitlines()[-1])
    print(built.stderr)
    assert path.is_file() and path.name.endswith(".oci.tar")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
    assert "oci-layout" in names
    result = Archive(path, index, {}, {})
    [entry] = index["manifests"]
    result.manifest = json.loads(result.blob(entry["digest"]))
    result.config = json.loads(result.blob(result.manifest["config"]["digest"]))
    return result


def test_named_like_make_image(archive: Archive) -> None:
    version = re.search(r'^version = "(.*)"$', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    reference = f"ghcr.io/berth-dev/berth:{version.group(1)}"
    [entry] = archive.index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == reference
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert archive.config["os"] == "linux" and archive.config["architecture"] == "amd64"
    assert len(archive.manifest["layers"]) == len(archive.config["rootfs"]["diff_ids"]) == 3


def test_config_is_the_dockerfiles(archive: Archive) -> None:
    config = archive.config["config"]
    assert config["User"] == "65532:65532"
    assert config.get("Entrypoint") is None
    assert config["Cmd"] == ["python", "-m", "registry_server"]
    assert config["WorkingDir"] == "/var/lib/berth"
    assert config["ExposedPorts"] == {"5000/tcp": {}}
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', FINAL_STAGE))
    assert len(labels) == 3
    assert config["Labels"] == labels
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/opt/berth/bin"
    assert {"/usr/local/bin", "/usr/bin", "/bin"} <= set(env["PATH"].split(":"))
    for name, value in {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "BERTH_HTTP_ADDR": "0.0.0.0:5000",
        "BERTH_STORAGE_ROOT": "/var/lib/berth",
    }.items():
        assert env[name] == value
        assert f"{name}={value}" in FINAL_STAGE


def test_layers(archive: Archive) -> None:
    base = archive.layer(0)
    passwd = archive.layer_file(0, "etc/passwd").decode()
    assert "berth:x:65532:65532::/var/lib/berth:/usr/sbin/nologin" in passwd.splitlines()
    assert "berth:x:65532:" in archive.layer_file(0, "etc/group").decode()
    home = base["var/lib/berth"]
    assert home.isdir() and (home.uid, home.gid, home.mode) == (65532, 65532, 0o750)
    assert base["usr/bin/python3"].issym() or base["usr/bin/python3"].isreg()
    # Container runtimes bring /dev; apt lists and docs stay out.
    assert not [n for n in base if n.startswith("dev/")]
    assert not [n for n in base if n.startswith("var/lib/apt/lists/") and "partial" not in n]
    assert not [n for n in base if n.startswith("usr/share/man/") and base[n].isfile()]
    docs = [n for n in base if n.startswith("usr/share/doc/") and base[n].isfile()]
    assert all(n.endswith("/copyright") for n in docs)

    deps, app = archive.layer(1), archive.layer(2)
    for layer in (deps, app):
        assert all(n == "opt/berth" or n.startswith("opt/berth/") for n in layer)
        assert all(m.uid == 0 and m.gid == 0 for m in layer.values())
    assert deps["opt/berth/bin/python"].issym()
    site = "opt/berth/lib/python3.11/site-packages"
    everything = {*deps, *app}
    for gone in ("pip", "setuptools", "kubernetes/aio"):
        assert f"{site}/{gone}" not in everything
    assert f"{site}/kubernetes/client/api_client.py" in deps
    assert f"{site}/registry_server/app.py" in app
    assert f"{site}/registry_operator/__main__.py" in app
    assert f"{site}/registry_server/__pycache__/app.cpython-311.pyc" in app


# -- containerd --------------------------------------------------------------------------


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_runs_under_containerd(archive: Archive, containerd: Containerd) -> None:
    reference = archive.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    containerd.ctr("images", "import", "--snapshotter", "native", str(archive.path), timeout=600)
    listed = containerd.ctr("images", "ls", "-q").split()
    assert reference in listed

    # `sh` is the base's; user, PATH and working directory are the image config's.
    probe = "id -u; id -g; command -v python; pwd; python -c 'import registry_server.app'"
    name = f"berth-{secrets.token_hex(4)}"
    out = containerd.ctr(
        "run", "--rm", "--snapshotter", "native", reference, name, "sh", "-c", probe
    ).split()
    assert out == ["65532", "65532", "/opt/berth/bin/python", "/var/lib/berth"]

    # The image's command: the server on the host's network, on a free port.
    port = free_port()
    name = f"berth-{secrets.token_hex(4)}"
    log = containerd.socket.parent / f"{name}.log"
    server = ManagedProcess(
        "berth in containerd",
        containerd.argv(
            "run",
            "--rm",
            "--net-host",
            "--snapshotter",
            "native",
            "--env",
            f"BERTH_HTTP_ADDR=127.0.0.1:{port}",
            reference,
            name,
        ),
        log,
    )
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{url}/v2/") == 200 or not server.running, timeout=60)
        assert server.running, server.log_tail()
        # A monolithic upload: the storage root is writable by the image's user.
        data = b"berth image-local\n"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        request = urllib.request.Request(
            f"{url}/v2/smoke/blobs/uploads/?digest={digest}", data=data, method="POST"
        )
        request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        assert _get(f"{url}/v2/smoke/blobs/{digest}") == 200
    finally:
        containerd.ctr("task", "kill", "-s", "SIGTERM", name, timeout=30, check=False)
        server.stop(timeout=30)
    assert server.returncode == 0, server.log_tail()
    assert '"msg": "listening"' in server.log_tail()
