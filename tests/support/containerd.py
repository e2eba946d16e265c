"""A containerd of a test's own: `running_containerd()`, behind the `containerd` fixture.

Socket, root and state in a temporary directory of a short name (unix socket paths are
limited to 108 bytes), the CRI plugin off; images go to the namespace `test`, and tests
pick the `native` snapshotter, which works on any file system. On the way out it kills
the containers left, stops containerd, kills any shim still naming its socket (shims run
in sessions of their own), undoes the mounts under its directory and removes it.
containerd needs root: the caller checks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .clients import run_tool, wait_for
from .processes import ManagedProcess
from .tools import require_tool

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


@dataclass
class Containerd:
    socket: Path
    namespace: str = "test"

    def argv(self, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        """The command line of `ctr <args>` against this containerd and namespace."""
        return [require_tool("ctr"), *self._options(*args)]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr <args>`; with `check`, a non-zero exit fails the test showing its output."""
        return run_tool("ctr", *self._options(*args), timeout=timeout, check=check)

    def ctr(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """The standard output of `ctr <args>` (see `run`)."""
        return self.run(*args, timeout=timeout, check=check).stdout

    def content(self, digest: str, timeout: float = 60) -> bytes:
        """The bytes containerd's content store holds under `digest`."""
        argv = self.argv("content", "get", digest)
        return subprocess.run(argv, capture_output=True, check=True, timeout=timeout).stdout

    def _options(self, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        return ["-a", self.socket, "-n", self.namespace, *args]


def _mounts_under(path: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(f"{path}/"):
            mounts.append(point)
    return sorted(mounts, key=len, reverse=True)


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (our containerd's shims name its socket)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry))
    return found


@contextlib.contextmanager
def running_containerd(start_timeout: float = 30) -> Iterator[Containerd]:
    """A containerd started for the block, answering `ctr version`; removed afterwards."""
    binary = require_tool("containerd")
    require_tool("ctr")
    workdir = Path(tempfile.mkdtemp(prefix="berth-ctrd-"))
    socket = workdir / "c.sock"
    config = workdir / "config.toml"
    config.write_text(_CONFIG.format(root=workdir / "root", state=workdir / "state", socket=socket))
    process = ManagedProcess("containerd", [binary, "--config", config], workdir / "containerd.log")
    process.start()
    daemon = Containerd(socket)
    try:
        wait_for(lambda: daemon.run("version", check=False).returncode == 0, timeout=start_timeout)
        yield daemon
    finally:
        listed = daemon.ctr("c", "ls", "-q", check=False)
        for container in listed.split():
            for args in (("task", "kill", "-s", "SIGKILL"), ("task", "rm", "-f"), ("c", "rm")):
                daemon.ctr(*args, container, check=False)
        process.stop()
        for pid in _processes_naming(str(socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in _mounts_under(workdir):
            subprocess.run(["umount", "-R", "-l", point], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
