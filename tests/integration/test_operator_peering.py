"""Peering on a real control plane: replicas share a ClusterKopfPeering, one acts.

Runs operators without --standalone, as the chart does. (The other operator modules use
--standalone; pytest runs modules one after another, so their operators never overlap.)
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.control_plane import ControlPlane
from tests.support.operator_process import OperatorProcess

pytestmark = pytest.mark.integration


def _operator(
    plane: ControlPlane, workdir: Path, name: str, peering: str, priority: int
) -> OperatorProcess:
    args = (f"--peering={peering}", f"--priority={priority}", "--log-format=plain")
    return OperatorProcess(plane, workdir, args, name=name).start()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    processes: list[OperatorProcess] = []

    def start(*args: Any) -> OperatorProcess:
        process = _operator(*args)
        processes.append(process)
        return process

    try:
        yield start
    finally:
        for process in processes:
            process.stop()


def _wait(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def _apply(plane: ControlPlane, namespace: str, name: str) -> None:
    document = {"apiVersion": "berth.dev/v1alpha1", "kind": "Registry", "metadata": {"name": name}}
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))


def _deployed(plane: ControlPlane, namespace: str, name: str) -> bool:
    result = plane.kubectl("get", "deployment", name, "-n", namespace, check=False)
    return result.returncode == 0


def test_one_replica_acts_and_the_higher_priority_wins(
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    started: Callable[..., OperatorProcess],
) -> None:
    peering = f"berth-test-{secrets.token_hex(3)}"
    try:
        _leader_changes(control_plane, namespace, tmp_path, started, peering)
    finally:
        control_plane.kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found")


def _leader_changes(
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    started: Callable[..., OperatorProcess],
    peering: str,
) -> None:
    low = started(control_plane, tmp_path, "low", peering, 100)
    # The operator creates the peering object Kopf needs, and keeps itself alive in it.
    peers = _wait(
        lambda: control_plane.kubectl_json("get", "clusterkopfpeering", peering).get("status"),
        "a keep-alive in the peering object",
    )
    assert [p["priority"] for p in peers.values()] == [100]
    _apply(control_plane, namespace, "first")
    _wait(lambda: _deployed(control_plane, namespace, "first"), "the active replica to act")

    high = started(control_plane, tmp_path, "high", peering, 200)
    _wait(lambda: "Pausing operations" in low.log(400), "the lower priority to pause")
    _apply(control_plane, namespace, "second")
    _wait(lambda: _deployed(control_plane, namespace, "second"), "the new leader to act")
    # The handler logs once its whole reconcile (children, then access) is done.
    _wait(lambda: f"[{namespace}/second]" in high.log(400), "the new leader's log line")
    assert f"[{namespace}/second]" not in low.log(400)
