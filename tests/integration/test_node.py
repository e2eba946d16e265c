"""The test node itself: pods run, Services and DNS work, PVCs bind, and a kubelet pulls
from a Berth server on localhost with a dockerconfigjson Secret (and is refused without).

These check the test ground (tests/support/node.py) and the one fact everything else
rests on: a node's containerd pulls `localhost:<port>/...` over plain HTTP, with the
credentials of an image pull Secret keyed by that address.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import NodeCluster
from tests.integration.test_auth_clients import SECRETS, start_auth_registry
from tests.support.clients import skopeo
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def node_namespace(node_cluster: NodeCluster) -> Iterator[str]:
    name = f"node-{secrets.token_hex(3)}"
    node_cluster.plane.kubectl("create", "namespace", name)
    # Pods need their namespace's default ServiceAccount (admission is on here).
    deadline = time.monotonic() + 30
    while node_cluster.plane.kubectl("-n", name, "get", "sa", "default", check=False).returncode:
        assert time.monotonic() < deadline, "no default ServiceAccount"
        time.sleep(0.2)
    try:
        yield name
    finally:
        node_cluster.plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pod(name: str, image: str, *, pull: str = "Always", **spec: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "imagePullPolicy": pull}],
                **spec,
            },
        }
    )


def wait_pod(
    cluster: NodeCluster,
    namespace: str,
    name: str,
    done: Callable[[Any], bool],
    timeout: float = 90,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.plane.kubectl(
            "-n", namespace, "get", "pod", name, "-o", "json", check=False
        )
        body = json.loads(result.stdout) if result.returncode == 0 else None
        if body is not None and done(body):
            return body
        if time.monotonic() > deadline:
            events = cluster.plane.kubectl("-n", namespace, "get", "events", check=False).stdout
            raise AssertionError(
                f"pod {name} not as expected: {body and body.get('status')}\n{events}"
            )
        time.sleep(0.5)


def running_or_done(body: Any) -> bool:
    return bool(body["status"].get("phase") in ("Running", "Succeeded"))


def waiting_reason(body: Any) -> str:
    for status in body["status"].get("containerStatuses") or []:
        waiting = status.get("state", {}).get("waiting")
        if waiting:
            return str(waiting.get("reason", ""))
    return ""


def logs(cluster: NodeCluster, namespace: str, name: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        result = cluster.plane.kubectl("-n", namespace, "logs", name, check=False)
        if result.stdout.strip() or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.5)


def test_node_is_ready_and_a_pod_runs_a_loaded_image(
    node_cluster: NodeCluster, node_namespace: str
) -> None:
    node = node_cluster.node
    archive = node.load_busybox("berth.local/hello:loaded", "hello from the node")
    node.import_image(archive)
    node_cluster.plane.kubectl(
        "-n",
        node_namespace,
        "apply",
        "-f",
        "-",
        input=pod("hello", "berth.local/hello:loaded", pull="Never"),
    )
    wait_pod(node_cluster, node_namespace, "hello", running_or_done)
    assert "hello from the node" in logs(node_cluster, node_namespace, "hello")
    print(f"node timings: {node.timings}")


def test_service_dns_and_the_api_server_from_a_pod(
    node_cluster: NodeCluster, node_namespace: str
) -> None:
    node = node_cluster.node
    node.import_image(node.load_busybox("berth.local/hello:loaded", "hello from the node"))
    script = (
        "nslookup kubernetes.default.svc.cluster.local && "
        # The API server answers through the `kubernetes` Service (401 without a token
        # is an answer: the route through kube-proxy works).
        "wget -qO- --no-check-certificate https://kubernetes.default.svc/healthz; echo rc=$?"
    )
    body = yaml.safe_load(pod("dns", "berth.local/hello:loaded", pull="Never"))
    body["spec"]["containers"][0]["command"] = ["/bin/sh", "-c", script]
    node_cluster.plane.kubectl("-n", node_namespace, "apply", "-f", "-", input=yaml.safe_dump(body))
    wait_pod(node_cluster, node_namespace, "dns", lambda b: b["status"].get("phase") == "Succeeded")
    output = logs(node_cluster, node_namespace, "dns")
    assert "198.18.128.1" in output, output
    assert "rc=" in output, output


def test_a_pvc_binds_to_a_provisioned_volume(
    node_cluster: NodeCluster, node_namespace: str
) -> None:
    node_cluster.plane.kubectl(
        "-n",
        node_namespace,
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
        ),
    )
    deadline = time.monotonic() + 60
    while True:
        phase = node_cluster.plane.kubectl(
            "-n", node_namespace, "get", "pvc", "data", "-o", "jsonpath={.status.phase}"
        ).stdout
        if phase == "Bound":
            break
        assert time.monotonic() < deadline, f"PVC {phase}"
        time.sleep(0.5)


def dockerconfigjson(host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {host: {"username": user, "password": password, "auth": auth}}}
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "pull"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
        }
    )


def test_kubelet_pulls_from_localhost_with_a_pull_secret_and_not_without(
    node_cluster: NodeCluster,
    node_namespace: str,
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
) -> None:
    registry = start_auth_registry(registry_process, tmp_path)
    port = registry.process.port
    archive = node_cluster.node.load_busybox("berth.local/pulled:v1", "pulled with a secret")
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"root:{SECRETS['root']}",
        f"oci-archive:{archive}",
        f"docker://127.0.0.1:{port}/team-a/hello:v1",
    )
    image = f"localhost:{port}/team-a/hello:v1"
    plane = node_cluster.plane

    plane.kubectl(
        "-n",
        node_namespace,
        "apply",
        "-f",
        "-",
        input=dockerconfigjson(f"localhost:{port}", "alice", SECRETS["alice"]),
    )
    plane.kubectl(
        "-n",
        node_namespace,
        "apply",
        "-f",
        "-",
        input=pod("with-secret", image, imagePullSecrets=[{"name": "pull"}]),
    )
    wait_pod(node_cluster, node_namespace, "with-secret", running_or_done)
    assert "pulled with a secret" in logs(node_cluster, node_namespace, "with-secret")

    plane.kubectl("-n", node_namespace, "apply", "-f", "-", input=pod("without", image))
    wait_pod(
        node_cluster,
        node_namespace,
        "without",
        lambda b: waiting_reason(b) in ("ErrImagePull", "ImagePullBackOff"),
    )
    events = plane.kubectl(
        "-n", node_namespace, "get", "events", "--field-selector", "involvedObject.name=without"
    ).stdout
    # The token flow answers an anonymous pull with a scope it refuses.
    assert "authorization failed" in events or "401 Unauthorized" in events, events


def test_clean_host_removes_what_a_crashed_node_left() -> None:
    """Bring-up starts with clean_host(): the rules, links, addresses, cgroups, files and
    sysctls a killed run left are gone after it (runs before the node tests start)."""
    from tests.support import node as node_support

    reason = node_support.unavailable_reason()
    if reason:
        node_support.skip_or_fail(reason)
    assert node_support.leftovers() == [], "a node is up or was left behind"
    forwarding = node_support._read_sysctl("net/ipv4/ip_forward")
    node_support.prepare_host()  # what a run does before it starts anything
    (node_support.NODE_ROOT / "containerd").mkdir()
    for variant in node_support._iptables_variants()[:1]:
        node_support._run(variant, "-t", "nat", "-N", "KUBE-LEFT-BEHIND")
        node_support._run(variant, "-t", "nat", "-A", "OUTPUT", "-j", "KUBE-LEFT-BEHIND")
    for hierarchy in ("memory", "pids"):
        group = Path("/sys/fs/cgroup") / hierarchy / node_support.CGROUP_ROOT / "kubepods"
        if group.parent.parent.exists():
            group.mkdir(parents=True)
    left = node_support.leftovers()
    assert any("rule" in item for item in left) and any("link" in item for item in left), left

    node_support.clean_host()  # as the next bring-up (or teardown) does
    assert node_support.leftovers() == []
    assert node_support._read_sysctl("net/ipv4/ip_forward") == forwarding
