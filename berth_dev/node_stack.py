"""`make run` on a real node: Berth runs as pods, as on a cluster.

Where this machine can run the test node (Linux, root, `make tools` done) the local
stack is: a control plane made for a node, the node (containerd, kubelet, kube-proxy,
scheduler, CoreDNS, volumes), the Berth image built here and loaded into the node,
`helm install` of helm/berth, and samples/ applied. Each Registry's pod runs on its
PVC, its node proxy serves `localhost:<port>` on this machine, and pods in granted
namespaces pull from there. Elsewhere berth_dev.stack falls back to the process
stand-in (the registry started from the rendered pod spec) and says so.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support import node as node_support
from tests.support import node_stack
from tests.support.control_plane import ControlPlane
from tests.support.tools import find_tool

Log = Callable[[str], None]


def unavailable_reason() -> str | None:
    """Why `make run` cannot use the node here (None: it can)."""
    reason = node_support.unavailable_reason()
    if reason:
        return reason
    needed = (*node_support.NODE_COMPONENTS, "containerd", "ctr", "runc", "iptables", "helm")
    missing = [name for name in needed if find_tool(name) is None]
    if missing:
        return f"missing tools {', '.join(missing)}: run `make tools`"
    return None


def sample_registries(samples: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(samples.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "Registry":
                meta = document["metadata"]
                found.append((str(meta["namespace"]), str(meta["name"])))
    return found


class NodeStack:
    """The control plane, the node and Berth installed on it, under one workdir."""

    def __init__(self, workdir: Path, *, samples: Path, log: Log) -> None:
        self.workdir = workdir
        self.samples = samples
        self.log = log
        self.plane = ControlPlane(workdir / "control-plane", node_ip=node_support.NODE_IP)
        self.node = node_support.Node(self.plane, workdir / "node")
        self.installed: node_stack.Installed | None = None
        self.registries: list[dict[str, Any]] = []

    def start(self) -> list[dict[str, Any]]:
        self.log("preparing the host for the node (cleaning what a crashed run left)")
        node_support.prepare_host()
        self.log("starting the control plane on the node address")
        self.plane.start()
        self.log("starting the node (containerd, kubelet, kube-proxy, scheduler, CoreDNS)")
        self.node.start()
        self.log(f"node Ready in {self.node.timings['node_ready']:.1f}s")
        self.log("building the Berth image and installing the chart with helm")
        self.installed = node_stack.install(self.plane, self.node, self.log)
        self.log(f"applying {self.samples}")
        self.plane.kubectl("apply", "-f", str(self.samples))
        for namespace, name in sample_registries(self.samples):
            self.log(f"waiting for Registry {namespace}/{name} to be Ready")
            body = self.installed.wait_registry_ready(namespace, name)
            self.registries.append(
                {
                    "namespace": namespace,
                    "name": name,
                    "endpoint": body["status"]["pullEndpoint"],
                    "username": "admin",
                    "password": self.installed.admin_password(namespace, name),
                }
            )
        return self.registries

    def check(self) -> None:
        for process in [*self.plane.processes, *self.node.processes]:
            if not process.running:
                raise RuntimeError(f"{process.name} exited; log: {process.log_path}")

    def stop(self) -> None:
        self.node.stop()
        self.plane.stop()
        node_support.clean_host()
        left = node_support.leftovers()
        if left:
            self.log(f"could not remove: {left}")


def banner(stack: NodeStack, seconds: float) -> str:
    lines = [
        f"Berth is up on a local node ({seconds:.1f}s): the operator, each Registry and its",
        "node proxy run as pods. Ctrl-C stops everything.",
        "",
    ]
    for registry in stack.registries:
        creds = f"{registry['username']}:{registry['password']}"
        image = f"{registry['endpoint']}/team-a/api:v1"
        lines += [
            f"Registry {registry['namespace']}/{registry['name']}",
            f"  endpoint  {registry['endpoint']}  (the node proxy; plain HTTP on loopback)",
            f"  username  {registry['username']}",
            f"  password  {registry['password']}",
            "  push      skopeo copy --dest-tls-verify=false "
            f"--dest-creds '{creds}' oci:./image:v1 docker://{image}",
            f"  run       kubectl -n team-a run api --image={image} --image-pull-policy=Always",
            "",
        ]
    lines += [
        f"kubectl:    export KUBECONFIG={stack.plane.kubeconfig}",
        f"            alias kubectl={stack.plane.kubectl_path}",
        "            kubectl get registries,repositories -A; kubectl get pods -A",
    ]
    return "\n".join(lines)


def write_ready_file(path: Path, stack: NodeStack, seconds: float) -> None:
    info = {
        "mode": "node",
        "startup_seconds": round(seconds, 2),
        "kubeconfig": str(stack.plane.kubeconfig),
        "kubectl": str(stack.plane.kubectl_path),
        "workdir": str(stack.workdir),
        "registries": stack.registries,
        "timings": {**stack.node.timings, **(stack.installed.timings if stack.installed else {})},
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    temporary.chmod(0o600)  # it holds passwords
    temporary.replace(path)


def run(
    workdir: Path,
    *,
    samples: Path,
    ready_file: Path | None,
    exit_after_ready: bool,
    remove: bool,
    log: Log,
    stop_signals: Sequence[type[BaseException]],
) -> int:
    """Run the node stack until one of `stop_signals` is raised; returns the exit status."""
    started = time.monotonic()
    stack = NodeStack(workdir, samples=samples, log=log)
    status = 0
    try:
        stack.start()
        seconds = time.monotonic() - started
        print("\n" + banner(stack, seconds) + "\n", flush=True)
        if ready_file is not None:
            write_ready_file(ready_file, stack, seconds)
        while not exit_after_ready:
            time.sleep(1)
            stack.check()
    except tuple(stop_signals) as stop:
        log(f"{stop}: stopping")
    except Exception as exc:  # reported; logs kept; everything stopped below
        print(f"berth-dev: {exc}", flush=True)
        status = 1
    finally:
        stack.stop()
        if remove and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif status:
            print(f"berth-dev: logs kept in {workdir}", flush=True)
    return status
