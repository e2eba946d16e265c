"""The operator as a subprocess on the test control plane, as the chart runs it.

`python -m registry_operator` with the control plane's kubeconfig and its own liveness
endpoint on a free port; `start()` returns once that endpoint answers. Tests add flags
(`--standalone`, peering, timings) and environment as they need.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .control_plane import ControlPlane
from .processes import ManagedProcess, free_port, http_status, wait_until
from .tools import REPO_ROOT


class OperatorProcess:
    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        args: Sequence[str] = ("--standalone",),
        *,
        name: str = "berth-operator",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.process = ManagedProcess(
            name,
            [sys.executable, "-m", "registry_operator", *args, "--liveness", self.liveness],
            workdir / f"{name}.log",
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig), **(env or {})},
            cwd=REPO_ROOT,
        )

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.process.start()
        wait_until(
            lambda: http_status(self.liveness) == 200,
            timeout=timeout,
            what="the operator's liveness endpoint",
            process=self.process,
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def rss_kib(self) -> tuple[int, int]:
        """(current, peak) resident memory of the operator process in KiB (Linux)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    def log(self, lines: int = 80) -> str:
        return self.process.log_tail(lines)
