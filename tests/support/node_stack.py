"""Berth installed on the test node as a user installs it: the image built here and
loaded into the node's containerd, `helm install` of helm/berth, `kubectl apply` of
samples/. Shared by the node end-to-end tests and `make run`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .control_plane import ControlPlane
from .node import Node
from .tools import REPO_ROOT, require_tool

CHART = REPO_ROOT / "helm" / "berth"
SAMPLES = REPO_ROOT / "samples"
RELEASE = "berth"
OPERATOR_NAMESPACE = "berth-system"
# Helm's own state (repository cache, registry logins) stays out of the home directory.
HELM_HOME = Path(tempfile.gettempdir()) / "berth-node-helm"


def build_image(log: Callable[[str], None] = print) -> tuple[Path, float]:
    """The Berth image as an OCI archive (berth_dev.image, cached by its inputs), and
    the seconds the build took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "berth_dev.image", "build"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the Berth image failed:\n{result.stdout}{result.stderr}")
    lines = result.stdout.strip().splitlines()
    archive = Path(lines[-1])
    log(f"image: {archive} ({time.monotonic() - started:.1f}s)")
    return archive, time.monotonic() - started


def helm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(HELM_HOME / "cache"),
        "HELM_CONFIG_HOME": str(HELM_HOME / "config"),
        "HELM_DATA_HOME": str(HELM_HOME / "data"),
    }
    result = subprocess.run(
        [str(require_tool("helm")), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180, interval: float = 1) -> Any:
    """Poll `check` until it returns something truthy; raise naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def get_json(plane: ControlPlane, *args: str) -> Any:
    result = plane.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def condition(body: Any, kind: str) -> str | None:
    for item in (body or {}).get("status", {}).get("conditions", []):
        if item.get("type") == kind:
            return str(item.get("status"))
    return None


@dataclass
class Installed:
    """Berth as installed on the node, and what it took."""

    plane: ControlPlane
    node: Node
    image: str
    timings: dict[str, float]

    def registry(self, namespace: str, name: str) -> Any:
        return get_json(self.plane, "registry", name, "-n", namespace)

    def wait_registry_ready(self, namespace: str, name: str, timeout: float = 300) -> Any:
        def ready() -> Any:
            body = self.registry(namespace, name)
            if condition(body, "Ready") == "True" and body["status"].get("pullEndpoint"):
                return body
            return None

        try:
            return wait_for(
                f"Registry {namespace}/{name} Ready with a pull endpoint", ready, timeout
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe(namespace)}") from None

    def describe(self, namespace: str) -> str:
        """What a person would look at when a Registry does not get Ready."""
        shown = []
        for args in (
            ("get", "registries,deployments,replicasets,pods,pvc", "-o", "wide"),
            ("get", "events", "--sort-by=.lastTimestamp"),
        ):
            result = self.plane.kubectl(*args, "-n", namespace, check=False)
            shown.append(
                f"$ kubectl {' '.join(args)} -n {namespace}\n{result.stdout}{result.stderr}"
            )
        return "\n".join(shown)

    def admin_password(self, namespace: str, registry: str) -> str:
        secret = get_json(self.plane, "secret", f"{registry}-auth", "-n", namespace)
        return base64.b64decode(secret["data"]["admin-password"]).decode()


def install(plane: ControlPlane, node: Node, log: Callable[[str], None] = print) -> Installed:
    """Build and load the image, `helm install` the chart, wait for the operator pod."""
    timings: dict[str, float] = {}
    archive, timings["image_build"] = build_image(log)
    started = time.monotonic()
    node.import_image(archive)
    timings["image_import"] = time.monotonic() - started
    image = subprocess.run(
        [sys.executable, "-m", "berth_dev.image", "ref"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    ).stdout.strip()
    kubeconfig = f"--kubeconfig={plane.kubeconfig}"
    started = time.monotonic()
    helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        kubeconfig,
    )
    plane.kubectl(
        "-n", OPERATOR_NAMESPACE, "rollout", "status", "deployment", "--timeout=300s", timeout=320
    )
    timings["helm_install_to_operator_ready"] = time.monotonic() - started
    log(f"operator ready in {timings['helm_install_to_operator_ready']:.1f}s")
    return Installed(plane, node, image, timings)
