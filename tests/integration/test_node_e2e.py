"""Berth's promise, proven on a real node: `helm install`, `kubectl apply -f samples/`,
and pods in a granted namespace pull their image from the Registry with the Secret
Berth wrote, through the node-local proxy on `localhost:<port>`.

Everything runs as pods on the test node (tests/support/node.py): the operator from the
chart, the Registry's server on its PVC, its node proxy DaemonSet, and the workloads,
whose images were pushed to the Registry here (no public registry is reachable).
Access tests use `imagePullPolicy: Always`: an image already on the node would run
without any credential under IfNotPresent.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import NodeCluster
from tests.support import node_stack
from tests.support.clients import run_tool, skopeo
from tests.support.node_stack import Installed, condition, get_json, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "registries"
REGISTRY = "main"
REPOSITORY = "team-a-api"
PULL_SECRET = f"{REGISTRY}-{NAMESPACE}-pull"


@pytest.fixture(scope="module")
def berth(node_cluster: NodeCluster) -> Iterator[Installed]:
    installed = node_stack.install(node_cluster.plane, node_cluster.node)
    started = time.monotonic()
    node_cluster.plane.kubectl("apply", "-f", str(node_stack.SAMPLES))
    installed.wait_registry_ready(NAMESPACE, REGISTRY)
    installed.timings["apply_to_registry_ready"] = time.monotonic() - started
    yield installed
    print(f"node e2e timings: {json.dumps(installed.timings, indent=1)}")


def endpoint(berth: Installed, namespace: str = NAMESPACE, name: str = REGISTRY) -> str:
    return str(berth.registry(namespace, name)["status"]["pullEndpoint"])


def push(
    berth: Installed,
    tmp_path: Path,
    reference: str,
    message: str,
    registry: str = REGISTRY,
    namespace: str = NAMESPACE,
) -> None:
    """Push a busybox image printing `message` through the node path (the node proxy's
    port on this host's loopback), as the Registry's admin."""
    archive = berth.node.load_busybox(f"berth.local/{secrets.token_hex(4)}:v", message)
    password = berth.admin_password(namespace, registry)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"admin:{password}",
        f"oci-archive:{archive}",
        f"docker://{endpoint(berth, namespace, registry)}/{reference}",
    )


def run_pod(berth: Installed, namespace: str, name: str, image: str, **spec: Any) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Always"}],
            **spec,
        },
    }
    berth.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))


def pod_outcome(berth: Installed, namespace: str, name: str, timeout: float = 120) -> str:
    """'running' once the pod runs, or the reason its image could not be pulled."""

    def outcome() -> str | None:
        body = get_json(berth.plane, "pod", name, "-n", namespace)
        if body is None:
            return None
        if body["status"].get("phase") in ("Running", "Succeeded"):
            return "running"
        for status in body["status"].get("containerStatuses") or []:
            reason = status.get("state", {}).get("waiting", {}).get("reason", "")
            if reason in ("ErrImagePull", "ImagePullBackOff"):
                return reason
        return None

    return str(wait_for(f"pod {namespace}/{name} to run or fail to pull", outcome, timeout))


def rotation_diagnostics(berth: Installed) -> str:
    """What a stalled rotation leaves to look at: the Repository's status and the
    operator's last lines."""
    status = berth.plane.kubectl(
        "-n", NAMESPACE, "get", "repository", REPOSITORY, "-o", "jsonpath={.status}", check=False
    ).stdout
    logs = berth.plane.kubectl(
        "-n", "berth-system", "logs", "deploy/berth", "--tail=120", check=False
    )
    return f"Repository status: {status}\n--- operator log ---\n{logs.stdout}{logs.stderr}"


def pod_events(berth: Installed, namespace: str, name: str) -> str:
    return berth.plane.kubectl(
        "-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={name}"
    ).stdout


def pod_logs(berth: Installed, namespace: str, name: str) -> str:
    return str(
        wait_for(
            f"logs of {namespace}/{name}",
            lambda: berth.plane.kubectl("-n", namespace, "logs", name, check=False).stdout.strip(),
            timeout=60,
        )
    )


def ensure_namespace(berth: Installed, name: str) -> None:
    berth.plane.kubectl("create", "namespace", name, check=False)
    wait_for(
        f"ServiceAccount {name}/default",
        lambda: get_json(berth.plane, "sa", "default", "-n", name),
        timeout=60,
    )


def refused_for_lack_of_access(events: str) -> bool:
    return "authorization failed" in events or "401 Unauthorized" in events


def test_samples_give_a_ready_registry_whose_pod_runs_on_its_pvc(berth: Installed) -> None:
    body = berth.registry(NAMESPACE, REGISTRY)
    assert condition(body, "Ready") == "True"
    assert body["status"]["pullEndpoint"].startswith("localhost:")
    listing = berth.plane.kubectl("get", "registries", "-A").stdout
    assert "True" in listing and body["status"]["pullEndpoint"] in listing, listing
    pvc = get_json(berth.plane, "pvc", f"{REGISTRY}-data", "-n", NAMESPACE)
    assert pvc["status"]["phase"] == "Bound"
    pods = get_json(berth.plane, "pods", "-n", NAMESPACE)["items"]
    phases = {p["metadata"]["name"]: p["status"]["phase"] for p in pods}
    assert any(n.startswith(f"{REGISTRY}-node-proxy") for n in phases), phases
    assert set(phases.values()) == {"Running"}, phases
    operator = get_json(berth.plane, "pods", "-n", node_stack.OPERATOR_NAMESPACE)["items"]
    assert [p["status"]["phase"] for p in operator] == ["Running"]


def test_a_granted_namespace_pulls_and_others_do_not(berth: Installed, tmp_path: Path) -> None:
    push(berth, tmp_path, "team-a/api:v1", "hello from team-a/api v1")
    image = f"{endpoint(berth)}/team-a/api:v1"
    wait_for(
        "the pull Secret on team-a's default ServiceAccount",
        lambda: PULL_SECRET in json.dumps(get_json(berth.plane, "sa", "default", "-n", "team-a")),
    )

    run_pod(berth, "team-a", "api", image)  # no imagePullSecrets: the ServiceAccount has it
    assert pod_outcome(berth, "team-a", "api") == "running", pod_events(berth, "team-a", "api")
    assert "hello from team-a/api v1" in pod_logs(berth, "team-a", "api")

    ensure_namespace(berth, "team-b")
    run_pod(berth, "team-b", "api", image)
    assert pod_outcome(berth, "team-b", "api") in ("ErrImagePull", "ImagePullBackOff")
    assert refused_for_lack_of_access(pod_events(berth, "team-b", "api"))


def test_revoking_stops_new_pulls_and_rotating_keeps_them_working(
    berth: Installed, tmp_path: Path
) -> None:
    push(berth, tmp_path, "team-a/api:v2", "hello from team-a/api v2")
    image = f"{endpoint(berth)}/team-a/api:v2"
    plane = berth.plane

    patch = {"spec": {"pullAccess": {"namespaces": [], "serviceAccounts": ["default"]}}}
    plane.kubectl(
        "-n", NAMESPACE, "patch", "repository", REPOSITORY, "--type=merge", "-p", json.dumps(patch)
    )
    wait_for(
        "the pull Secret gone from team-a",
        lambda: get_json(plane, "secret", PULL_SECRET, "-n", "team-a") is None,
    )
    run_pod(berth, "team-a", "revoked", image)
    assert pod_outcome(berth, "team-a", "revoked") in ("ErrImagePull", "ImagePullBackOff")
    assert refused_for_lack_of_access(pod_events(berth, "team-a", "revoked"))

    patch["spec"]["pullAccess"]["namespaces"] = ["team-a"]
    plane.kubectl(
        "-n", NAMESPACE, "patch", "repository", REPOSITORY, "--type=merge", "-p", json.dumps(patch)
    )
    before = wait_for(
        "the pull Secret back in team-a",
        lambda: get_json(plane, "secret", PULL_SECRET, "-n", "team-a"),
    )
    plane.kubectl(
        "-n",
        NAMESPACE,
        "annotate",
        "--overwrite",
        "repository",
        REPOSITORY,
        f"berth.dev/rotate={time.time_ns()}",
    )
    try:
        # The new credential is handed out once the server has it: after the kubelet has
        # refreshed the pod's policy volume (its sync period is a minute) and a probe
        # (backing off to 15 s) has seen it.
        wait_for(
            "a rotated credential in team-a",
            lambda: (
                (s := get_json(plane, "secret", PULL_SECRET, "-n", "team-a")) is not None
                and s["data"] != before["data"]
            ),
            timeout=300,
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{rotation_diagnostics(berth)}") from exc
    run_pod(berth, "team-a", "rotated", image)
    assert pod_outcome(berth, "team-a", "rotated") == "running", pod_events(
        berth, "team-a", "rotated"
    )


def wait_serving(berth: Installed) -> None:
    """Until the Registry answers through the node path again: its status may still say
    Ready from before a pod was replaced, and the Service's endpoints and kube-proxy's
    rules follow the new pod a moment after it is Ready."""

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://{endpoint(berth)}/v2/", timeout=5)
        except urllib.error.HTTPError as err:
            return err.code == 401
        except OSError:
            return False
        return False

    wait_for("the registry answering through the node proxy", answers, timeout=120)


def registry_pod(berth: Installed) -> str:
    pods = get_json(
        berth.plane,
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        f"app.kubernetes.io/name=berth-registry,app.kubernetes.io/instance={REGISTRY}",
    )
    running = [
        p["metadata"]["name"]
        for p in pods["items"]
        if p["status"]["phase"] == "Running" and "deletionTimestamp" not in p["metadata"]
    ]
    return running[0] if len(running) == 1 else ""


def test_a_config_change_rolls_the_pod_and_a_deleted_pod_loses_no_image(
    berth: Installed, tmp_path: Path
) -> None:
    push(berth, tmp_path, "team-a/api:v3", "hello from team-a/api v3")
    image = f"{endpoint(berth)}/team-a/api:v3"
    first = registry_pod(berth)
    assert first
    berth.plane.kubectl(
        "-n",
        NAMESPACE,
        "patch",
        "registry",
        REGISTRY,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"logLevel": "debug"}}),
    )
    second = wait_for(
        "a new registry pod after the config change",
        lambda: (p := registry_pod(berth)) and p != first and p,
        timeout=240,
    )
    berth.wait_registry_ready(NAMESPACE, REGISTRY)
    wait_serving(berth)
    run_pod(berth, "team-a", "after-roll", image)
    assert pod_outcome(berth, "team-a", "after-roll") == "running", pod_events(
        berth, "team-a", "after-roll"
    )

    berth.plane.kubectl("-n", NAMESPACE, "delete", "pod", second, "--wait=false")
    wait_for(
        "a replacement registry pod",
        lambda: (p := registry_pod(berth)) and p != second and p,
        timeout=240,
    )
    berth.wait_registry_ready(NAMESPACE, REGISTRY)
    wait_serving(berth)
    run_pod(berth, "team-a", "after-delete", image)
    assert pod_outcome(berth, "team-a", "after-delete") == "running", pod_events(
        berth, "team-a", "after-delete"
    )
    assert "hello from team-a/api v3" in pod_logs(berth, "team-a", "after-delete")


def test_pull_through_the_node_path_and_from_the_service(berth: Installed, tmp_path: Path) -> None:
    """A 50 MiB image pulled through localhost:<port> (node proxy) and straight from the
    Service's cluster IP, for the figures; both must give the same bytes."""
    layout = tmp_path / "big"
    from tests.support.images import make_oci_layout

    make_oci_layout(layout, "big", layer_size=50 * 1024 * 1024)
    password = berth.admin_password(NAMESPACE, REGISTRY)
    proxy = endpoint(berth)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"admin:{password}",
        f"oci:{layout}:big",
        f"docker://{proxy}/team-a/big:v1",
    )
    service = get_json(berth.plane, "service", REGISTRY, "-n", NAMESPACE)
    direct = f"{service['spec']['clusterIP']}:5000"
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
    timings = {}
    for name, host in (("node_proxy", proxy), ("service", direct)):
        run_tool("crane", "auth", "login", host, "-u", "admin", "-p", password, env=env)
        started = time.monotonic()
        run_tool(
            "crane", "pull", "--insecure", f"{host}/team-a/big:v1", str(tmp_path / name), env=env
        )
        timings[name] = time.monotonic() - started
    berth.timings.update({f"pull_50MiB_{k}": v for k, v in timings.items()})
    assert (tmp_path / "node_proxy").stat().st_size == (tmp_path / "service").stat().st_size


def region_objects(namespace: str, region: str, other: str) -> str:
    """A Registry in its own namespace as a region peered with `other`, and a
    Repository granting namespace team-r pull access through the default ServiceAccount."""
    registry = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": region, "namespace": namespace},
        "spec": {
            "region": region,
            "storage": {"pvc": {"size": "1Gi"}},
            "replication": {
                "peers": [
                    {"name": other, "registryRef": {"name": other, "namespace": f"region-{other}"}}
                ]
            },
        },
    }
    repository = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Repository",
        "metadata": {"name": "team-r-app", "namespace": namespace},
        "spec": {
            "registryRef": {"name": region},
            "path": "team-r/app",
            "pullAccess": {"namespaces": ["team-r"], "serviceAccounts": ["default"]},
        },
    }
    return yaml.safe_dump_all([registry, repository])


def test_two_regions_replicate_and_a_pod_pulls_in_each(berth: Installed, tmp_path: Path) -> None:
    plane = berth.plane
    for region in ("eu", "us"):
        ensure_namespace(berth, f"region-{region}")
    ensure_namespace(berth, "team-r")
    for region, other in (("eu", "us"), ("us", "eu")):
        plane.kubectl("apply", "-f", "-", input=region_objects(f"region-{region}", region, other))
    for region in ("eu", "us"):
        berth.wait_registry_ready(f"region-{region}", region)
    eu, us = endpoint(berth, "region-eu", "eu"), endpoint(berth, "region-us", "us")
    assert eu != us

    started = time.monotonic()
    push(berth, tmp_path, "team-r/app:v1", "hello from the eu push", "eu", "region-eu")
    pushed = time.monotonic()
    us_password = berth.admin_password("region-us", "us")

    def replicated() -> bool:
        result = skopeo(
            "inspect",
            "--tls-verify=false",
            "--creds",
            f"admin:{us_password}",
            f"docker://{us}/team-r/app:v1",
            check=False,
        )
        return result.returncode == 0

    wait_for("team-r/app:v1 replicated to us", replicated, timeout=120, interval=0.5)
    berth.timings["replication_push_done_to_pullable_in_us"] = time.monotonic() - pushed
    berth.timings["replication_push_start_to_pullable_in_us"] = time.monotonic() - started

    for region, host in (("eu", eu), ("us", us)):
        run_pod(berth, "team-r", f"app-{region}", f"{host}/team-r/app:v1")
        assert pod_outcome(berth, "team-r", f"app-{region}") == "running", pod_events(
            berth, "team-r", f"app-{region}"
        )
        assert "hello from the eu push" in pod_logs(berth, "team-r", f"app-{region}")
