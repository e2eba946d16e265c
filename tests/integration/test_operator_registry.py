"""The operator as a process against a real control plane: a Registry's whole life.

etcd, kube-apiserver and kube-controller-manager (garbage collector, Deployment and
ReplicaSet controllers) run for real; no kubelet does. Where a kubelet would report a
pod's state, the tests write the pod's status through the API, and the Deployment
controller turns that into the Deployment status the operator reads.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry_operator import models
from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.integration.test_notifications import Receiver
from tests.support import podspec_runner
from tests.support.clients import skopeo
from tests.support.control_plane import ControlPlane
from tests.support.images import make_oci_layout, tagged_digest
from tests.support.operator_process import OperatorProcess
from tests.support.operator_process import wait_for as _wait
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"
CHILDREN = (
    ("v1", "ConfigMap", names.config_map),
    ("v1", "Secret", names.secret),
    ("v1", "PersistentVolumeClaim", names.pvc),
    ("apps/v1", "Deployment", names.deployment),
    ("v1", "Service", names.service),
)
OWNED_KINDS = ("ConfigMap", "Secret", "Deployment", "Service", "Ingress")


Operator = OperatorProcess


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    running = OperatorProcess(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        ("--standalone", "--resync-seconds", "30"),
    ).start()
    try:
        yield running
    finally:
        running.stop()


# --- helpers ---------------------------------------------------------------------------


def _apply(plane: ControlPlane, name: str, namespace: str, spec: dict[str, Any]) -> None:
    document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": name}, "spec": spec}
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))


def _children(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any]:
    return {
        kind: kube.find(api_version, kind, namespace, name_of(name))
        for api_version, kind, name_of in CHILDREN
    }


def _all_children(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any] | None:
    found = _children(kube, namespace, name)
    return found if all(found.values()) else None


def _registry(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(API, "Registry", namespace, name)


def _conditions(kube: kube_client.Client, namespace: str, name: str) -> dict[str, tuple[str, str]]:
    status = _registry(kube, namespace, name).get("status") or {}
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or []}


def _converged(kube: kube_client.Client, namespace: str, name: str) -> bool:
    registry = _registry(kube, namespace, name)
    status = registry.get("status") or {}
    return status.get("observedGeneration") == registry["metadata"]["generation"]


def _events(plane: ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    found = plane.kubectl_json(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=Registry,involvedObject.name={name}",
    )
    items = sorted(found["items"], key=lambda e: e["metadata"]["creationTimestamp"])
    return [(e["type"], e["reason"], e["message"]) for e in items]


def _set_pods_ready(plane: ControlPlane, namespace: str, name: str, ready: bool) -> int:
    """Do what the kubelet would: report the registry's pods (not) running and ready."""
    pods = plane.kubectl_json(
        "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}"
    )["items"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flag = "True" if ready else "False"
    status = {
        "phase": "Running",
        "conditions": [
            {"type": kind, "status": flag, "lastTransitionTime": now}
            for kind in ("Ready", "ContainersReady")
        ],
    }
    for pod in pods:
        plane.kubectl(
            "patch",
            "pod",
            pod["metadata"]["name"],
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
    return len(pods)


def _checksum(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"][names.CHECKSUM_ANNOTATION])


def _secret_data(kube: kube_client.Client, namespace: str, name: str) -> dict[str, str]:
    secret = kube.get("v1", "Secret", namespace, names.secret(name))
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# --- create ------------------------------------------------------------------------------


def test_create_renders_every_child_owned_by_the_registry(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    ingress = {"host": "registry.example.com", "className": "nginx", "tls": {"secretName": "t"}}
    _apply(control_plane, "main", namespace, {"region": "eu-west", "ingress": ingress})
    children = _wait(lambda: _all_children(kube, namespace, "main"), operator, "all children")
    children["Ingress"] = _wait(
        lambda: kube.find("networking.k8s.io/v1", "Ingress", namespace, "main"), operator, "Ingress"
    )
    registry = _registry(kube, namespace, "main")
    owner = {
        "apiVersion": API,
        "kind": "Registry",
        "name": "main",
        "uid": registry["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for kind, child in children.items():
        meta = child["metadata"]
        expected = [owner] if kind in OWNED_KINDS else None
        assert meta.get("ownerReferences") == expected, kind
        assert meta["labels"][names.REGISTRY_LABEL] == "main"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "berth-operator"
        managers = {(m["manager"], m["operation"]) for m in meta["managedFields"]}
        assert ("berth", "Apply") in managers, kind

    pod = children["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == models.default_image()
    assert container["command"] == [
        "python",
        "-m",
        "registry_server",
        "--config",
        "/etc/berth/config/config.yaml",
    ]
    assert container["ports"][0]["containerPort"] == 5000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert children["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    assert _checksum(children["Deployment"]).startswith("sha256:")

    config = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert config["http"]["external_url"] == "https://registry.example.com"
    assert config["storage"]["root"] == "/var/lib/berth"

    secret = _secret_data(kube, namespace, "main")
    key = serialization.load_pem_private_key(secret["token.key"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    admin_hash = secret["htpasswd"].splitlines()[0].split(":", 1)[1]
    assert bcrypt.checkpw(secret["admin-password"].encode(), admin_hash.encode())

    assert children["Service"]["spec"]["ports"][0]["port"] == 5000
    assert children["Service"]["spec"]["type"] == "ClusterIP"
    assert children["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert children["Ingress"]["spec"]["tls"] == [{"hosts": [ingress["host"]], "secretName": "t"}]

    _wait(lambda: _converged(kube, namespace, "main"), operator, "status")
    status = _registry(kube, namespace, "main")["status"]
    assert status["endpoint"] == f"https://main.{namespace}.svc:5000"
    assert status["externalEndpoint"] == "https://registry.example.com"
    # No volume provisioner runs here: the claim stays Pending, and says so.
    assert _conditions(kube, namespace, "main")["StorageReady"] == ("False", "Pending")
    _wait(
        lambda: (
            {e[2] for e in _events(control_plane, namespace, "main")}
            >= {
                "created ConfigMap main-config",
                "created Secret main-auth",
                "created PersistentVolumeClaim main-data",
                "created Deployment main",
                "created Service main",
                "created Ingress main",
            }
        ),
        operator,
        "Created events",
    )


# --- status ------------------------------------------------------------------------------


def test_status_follows_the_deployment(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    # A port of its own (below the default range): no other Registry here can hold it.
    spec = {"storage": {"emptyDir": {}}, "nodeProxy": {"port": 5098}}
    _apply(control_plane, "st", namespace, spec)
    _wait(
        lambda: _conditions(kube, namespace, "st").get("Progressing") == ("True", "RollingOut"),
        operator,
        "Progressing while the pod is pending",
    )
    assert _conditions(kube, namespace, "st")["Ready"] == ("False", "RollingOut")
    assert _conditions(kube, namespace, "st")["StorageReady"] == ("True", "EmptyDir")

    _wait(lambda: _set_pods_ready(control_plane, namespace, "st", True), operator, "a pod")
    # AccessApplied (the access pass's own condition) comes and goes with Repositories.
    _wait(
        lambda: (
            {k: v for k, v in _conditions(kube, namespace, "st").items() if k != "AccessApplied"}
            == {
                "Ready": ("True", "Available"),
                "Progressing": ("False", "RolloutComplete"),
                "Degraded": ("False", "AsExpected"),
                "StorageReady": ("True", "EmptyDir"),
                "CertificateReady": ("True", "Valid"),
            }
        ),
        operator,
        "Ready once the pod is",
    )
    assert _conditions(kube, namespace, "st").get("AccessApplied", ("True",))[0] == "True"
    assert _registry(kube, namespace, "st")["status"]["readyReplicas"] == 1
    table = control_plane.kubectl("get", "registries", "-n", namespace).stdout
    assert table.splitlines()[1].split()[:5] == [
        "st",
        f"https://st.{namespace}.svc:5000",
        "localhost:5098",
        "True",
        "1",
    ]

    _set_pods_ready(control_plane, namespace, "st", False)
    _wait(
        lambda: _conditions(kube, namespace, "st").get("Degraded") == ("True", "Unavailable"),
        operator,
        "Degraded when the pod stops being ready",
    )
    assert _conditions(kube, namespace, "st")["Ready"] == ("False", "Unavailable")
    _set_pods_ready(control_plane, namespace, "st", True)
    _wait(
        lambda: _conditions(kube, namespace, "st").get("Degraded") == ("False", "AsExpected"),
        operator,
        "recovery",
    )
    wanted = {("Normal", "Ready"), ("Warning", "Unavailable"), ("Normal", "Recovered")}
    _wait(
        lambda: wanted <= {(e[0], e[1]) for e in _events(control_plane, namespace, "st")},
        operator,
        "Ready, Unavailable and Recovered events",
    )


def test_storage_ready_once_the_claim_is_bound(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    _apply(control_plane, "vol", namespace, {})
    _wait(lambda: _all_children(kube, namespace, "vol"), operator, "children")
    _wait(
        lambda: _conditions(kube, namespace, "vol").get("StorageReady") == ("False", "Pending"),
        operator,
        "StorageReady False while Pending",
    )
    # What the PV controller reports once a volume is bound.
    control_plane.kubectl(
        "patch",
        "pvc",
        "vol-data",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Bound"}}),
    )
    _wait(
        lambda: _conditions(kube, namespace, "vol").get("StorageReady") == ("True", "Bound"),
        operator,
        "StorageReady True once Bound",
    )


# --- update ------------------------------------------------------------------------------


def test_update_converges_and_rolls_pods_only_for_config(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    # The index in PostgreSQL, blobs on a shared claim: pods may overlap in a rollout.
    storage = {"pvc": {"accessModes": ["ReadWriteMany"], "storageClassName": "shared"}}
    db = {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}}
    _apply(control_plane, "up", namespace, {"storage": storage, "metadata": db})
    first = _wait(lambda: _all_children(kube, namespace, "up"), operator, "children")
    assert first["PersistentVolumeClaim"]["spec"]["storageClassName"] == "shared"
    assert first["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert first["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    secret = _secret_data(kube, namespace, "up")
    checksum = _checksum(first["Deployment"])

    resources = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    scaled_spec = {"storage": storage, "metadata": db, "replicas": 0, "resources": resources}
    _apply(control_plane, "up", namespace, scaled_spec)

    def scaled() -> dict[str, Any] | None:
        deployment = kube.get("apps/v1", "Deployment", namespace, "up")
        spec = deployment["spec"]
        ok = spec["replicas"] == 0 and spec["template"]["spec"]["containers"][0]["resources"] == (
            resources
        )
        return deployment if ok else None

    scaled_deployment = _wait(scaled, operator, "replicas and resources")
    # Neither is in a file the pods read: no reason to roll them for the config.
    assert _checksum(scaled_deployment) == checksum
    _wait(lambda: _converged(kube, namespace, "up"), operator, "observedGeneration")

    spec = {**scaled_spec, "logLevel": "debug"}
    _apply(control_plane, "up", namespace, spec)

    def reconfigured() -> bool:
        config_map = kube.get("v1", "ConfigMap", namespace, "up-config")
        return yaml.safe_load(config_map["data"]["config.yaml"])["log"]["level"] == "debug"

    _wait(reconfigured, operator, "the new config")
    _wait(
        lambda: _checksum(kube.get("apps/v1", "Deployment", namespace, "up")) != checksum,
        operator,
        "the checksum annotation to change",
    )
    _wait(lambda: _converged(kube, namespace, "up"), operator, "observedGeneration")
    assert _secret_data(kube, namespace, "up") == secret  # generated once, kept
    _wait(
        lambda: (
            {"updated Deployment up", "updated ConfigMap up-config"}
            <= {e[2] for e in _events(control_plane, namespace, "up") if e[1] == "Updated"}
        ),
        operator,
        "Updated events",
    )


def test_disruption_budget_follows_the_replicas(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    shared = {
        "replicas": 2,
        "storage": {"s3": {"bucket": "images", "credentialsSecretRef": {"name": "s3"}}},
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}},
    }
    _apply(control_plane, "ha", namespace, shared)

    def budget() -> Any:
        return kube.find("policy/v1", "PodDisruptionBudget", namespace, "ha")

    found = _wait(budget, operator, "the PodDisruptionBudget")
    assert found["spec"]["maxUnavailable"] == 1
    assert found["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "ha"
    assert found["metadata"]["ownerReferences"][0]["kind"] == "Registry"
    _apply(control_plane, "ha", namespace, {**shared, "replicas": 1})
    _wait(lambda: budget() is None, operator, "the PodDisruptionBudget to go with one replica")


# --- node access -------------------------------------------------------------------------


def _daemonset(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any] | None:
    return kube.find("apps/v1", "DaemonSet", namespace, names.node_proxy(name))


def _hosting(kube: kube_client.Client) -> dict[str, Any] | None:
    return kube.find("v1", "ConfigMap", "kube-public", "local-registry-hosting")


def test_node_proxy_is_rendered_published_and_switched_off(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    """The DaemonSet as the real API server stores it, the pull endpoint in the status and
    the printer column, KEP-1755's ConfigMap, drift, and switching the proxy off."""
    annotations = {models.LOCAL_REGISTRY_HOSTING_ANNOTATION: "true"}
    document = {
        "apiVersion": API,
        "kind": "Registry",
        "metadata": {"name": "nodes", "annotations": annotations},
        "spec": {"storage": {"emptyDir": {}}},
    }
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))
    port = names.default_node_port("nodes", namespace)
    daemonset = _wait(lambda: _daemonset(kube, namespace, "nodes"), operator, "the DaemonSet")
    registry = _registry(kube, namespace, "nodes")
    assert daemonset["metadata"]["ownerReferences"][0]["uid"] == registry["metadata"]["uid"]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["hostPort"] == port
    assert container["ports"][0]["hostIP"] == "127.0.0.1"
    assert container["command"][2:] == [
        "registry_server.node_proxy",
        "--listen", f"0.0.0.0:{port}",
        "--upstream", f"nodes.{namespace}.svc:5000",
        "--drain-seconds", "10",
        "--upstream-ca", "/etc/berth/tls-ca/ca.crt",
    ]  # fmt: skip
    assert container["image"] == models.default_image()

    _wait(
        lambda: (
            _registry(kube, namespace, "nodes").get("status", {}).get("pullEndpoint")
            == f"localhost:{port}"
        ),
        operator,
        "status.pullEndpoint",
    )
    row = control_plane.kubectl("get", "registry", "nodes", "-n", namespace).stdout
    assert f"localhost:{port}" in row.splitlines()[1].split()

    # Annotated "true": this Registry is the one named in kube-public.
    def published() -> dict[str, Any] | None:
        found = _hosting(kube)
        labels = (found or {}).get("metadata", {}).get("labels") or {}
        ours = labels.get(names.REGISTRY_NAMESPACE_LABEL) == namespace
        return found if ours and labels.get(names.REGISTRY_LABEL) == "nodes" else None

    hosting = yaml.safe_load(
        _wait(published, operator, "local-registry-hosting")["data"]["localRegistryHosting.v1"]
    )
    assert hosting["hostFromContainerRuntime"] == f"localhost:{port}"
    assert hosting["hostFromClusterNetwork"] == f"nodes.{namespace}.svc:5000"

    # Drift: a deleted DaemonSet and a deleted ConfigMap come back.
    uid = daemonset["metadata"]["uid"]
    control_plane.kubectl("delete", "daemonset", names.node_proxy("nodes"), "-n", namespace)
    _wait(
        lambda: (found := _daemonset(kube, namespace, "nodes")) and found["metadata"]["uid"] != uid,
        operator,
        "the DaemonSet to come back",
    )
    control_plane.kubectl("delete", "configmap", "local-registry-hosting", "-n", "kube-public")
    _wait(published, operator, "local-registry-hosting to come back")

    # Off: the DaemonSet and the endpoint go; the ConfigMap names someone else or goes.
    document["spec"] = {"storage": {"emptyDir": {}}, "nodeProxy": {"enabled": False}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))
    _wait(lambda: _daemonset(kube, namespace, "nodes") is None, operator, "the DaemonSet to go")
    _wait(
        lambda: "pullEndpoint" not in _registry(kube, namespace, "nodes").get("status", {}),
        operator,
        "status.pullEndpoint to go",
    )
    _wait(lambda: published() is None, operator, "local-registry-hosting to move on")


def test_a_contested_node_port_goes_to_the_older_registry(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    """Two Registries asking for one port: the younger is Degraded without a proxy, and
    gets the port once the older one is gone (the operator's index of Registries wakes it)."""
    spec = {"storage": {"emptyDir": {}}, "nodeProxy": {"port": 5099}}
    _apply(control_plane, "elder", namespace, spec)
    _wait(lambda: _daemonset(kube, namespace, "elder"), operator, "the elder's DaemonSet")
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    _apply(control_plane, "junior", namespace, spec)
    _wait(
        lambda: (
            _conditions(kube, namespace, "junior").get("Degraded") == ("True", "NodePortConflict")
        ),
        operator,
        "NodePortConflict",
    )
    assert _daemonset(kube, namespace, "junior") is None
    assert "pullEndpoint" not in _registry(kube, namespace, "junior")["status"]
    _wait(
        lambda: (
            ("Warning", "NodePortConflict")
            in {e[:2] for e in _events(control_plane, namespace, "junior")}
        ),
        operator,
        "the Warning event",
    )

    started = time.monotonic()
    control_plane.kubectl("delete", "registry", "elder", "-n", namespace)
    _wait(lambda: _daemonset(kube, namespace, "junior"), operator, "the junior's DaemonSet")
    # Well inside the module's 30 s resync: the deletion itself woke the junior.
    assert time.monotonic() - started < 15
    _wait(
        lambda: (
            _registry(kube, namespace, "junior")["status"].get("pullEndpoint") == "localhost:5099"
        ),
        operator,
        "the junior's pull endpoint",
    )
    assert _conditions(kube, namespace, "junior")["Degraded"][1] != "NodePortConflict"


# --- drift -------------------------------------------------------------------------------


def test_drift_is_repaired(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    _apply(control_plane, "drift", namespace, {})
    before = _wait(lambda: _all_children(kube, namespace, "drift"), operator, "children")
    _wait(lambda: _converged(kube, namespace, "drift"), operator, "first status")

    control_plane.kubectl("delete", "service", "drift", "-n", namespace)
    restored = _wait(
        lambda: (
            (svc := kube.find("v1", "Service", namespace, "drift"))
            and svc["metadata"]["uid"] != before["Service"]["metadata"]["uid"]
            and svc
        ),
        operator,
        "the Service to come back",
    )
    assert restored["spec"]["ports"][0]["port"] == 5000

    patch = {"spec": {"replicas": 4, "template": {"spec": {"containers": [
        {"name": "registry", "image": "example.com/evil:1"}
    ]}}}}  # fmt: skip
    control_plane.kubectl("patch", "deployment", "drift", "-n", namespace, "-p", json.dumps(patch))

    def repaired() -> bool:
        spec = kube.get("apps/v1", "Deployment", namespace, "drift")["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        return spec["replicas"] == 1 and image == models.default_image()

    _wait(repaired, operator, "the Deployment edit to be reverted")

    control_plane.kubectl("delete", "configmap", "drift-config", "-n", namespace)
    _wait(lambda: kube.find("v1", "ConfigMap", namespace, "drift-config"), operator, "ConfigMap")
    # Events are posted in the background: wait for them rather than race them.
    _wait(
        lambda: (
            {"Restored", "Repaired"} <= {e[1] for e in _events(control_plane, namespace, "drift")}
        ),
        operator,
        "Restored and Repaired events",
    )


# --- invalid spec ------------------------------------------------------------------------


def test_spec_the_server_cannot_serve_is_reported_and_not_retried(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    # A key prefix climbing out of its place: valid for the CRD, refused by the parser.
    s3 = {"s3": {"bucket": "images", "credentialsSecretRef": {"name": "s3"}, "prefix": "a/../b"}}
    db = {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}}
    _apply(control_plane, "s3", namespace, {"storage": s3, "metadata": db})
    _wait(
        lambda: _conditions(kube, namespace, "s3").get("Degraded") == ("True", "InvalidSpec"),
        operator,
        "Degraded InvalidSpec",
    )
    status = _registry(kube, namespace, "s3")["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == "spec.storage.s3.prefix: 'a/../b' is not a key prefix"
    assert _children(kube, namespace, "s3")["Deployment"] is None

    def warnings() -> list[tuple[str, str, str]]:
        return [e for e in _events(control_plane, namespace, "s3") if e[1] == "InvalidSpec"]

    _wait(warnings, operator, "the InvalidSpec event")  # posted in the background
    time.sleep(3)  # a retry loop would post more events meanwhile
    assert warnings() == [("Warning", "InvalidSpec", degraded["message"])]

    _apply(control_plane, "s3", namespace, {"storage": {"emptyDir": {}}, "metadata": db})
    _wait(lambda: _children(kube, namespace, "s3")["Deployment"], operator, "the fixed spec")
    _wait(
        lambda: _conditions(kube, namespace, "s3").get("Degraded") == ("False", "AsExpected"),
        operator,
        "Degraded cleared",
    )


# --- delete ------------------------------------------------------------------------------


def test_delete_collects_owned_children_and_keeps_the_claim(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    _apply(control_plane, "keep", namespace, {})
    _apply(control_plane, "drop", namespace, {"storage": {"pvc": {"deleteOnRegistryDelete": True}}})
    for name in ("keep", "drop"):
        _wait(lambda name=name: _all_children(kube, namespace, name), operator, "children")
    control_plane.kubectl("delete", "registry", "keep", "drop", "-n", namespace, timeout=60)

    def collected() -> bool:
        return all(
            child is None
            for name in ("keep", "drop")
            for kind, child in _children(kube, namespace, name).items()
            if kind != "PersistentVolumeClaim"
        )

    _wait(collected, operator, "garbage collection of the owned children", timeout=60)
    kept = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-data")
    assert "deletionTimestamp" not in kept["metadata"]
    # The owned claim is deleted too; its pvc-protection finalizer would be lifted by a
    # controller that does not run here, so "being deleted" is as far as it gets.
    _wait(
        lambda: (
            (pvc := kube.find("v1", "PersistentVolumeClaim", namespace, "drop-data")) is None
            or "deletionTimestamp" in pvc["metadata"]
        ),
        operator,
        "the owned claim to be deleted",
        timeout=60,
    )


# --- restart -----------------------------------------------------------------------------


def _blocking_service_creation(plane: ControlPlane, namespace: str) -> AbstractContextManager[str]:
    """An admission policy refusing new Services here: it stops a reconcile half-way."""
    return plane.refusing(
        namespace,
        f"block-services-{namespace}"[:63],
        resource="services",
        operations=["CREATE"],
        expression="false",
        message="blocked by the test",
        reason="Forbidden",
        probe=["create", "service", "clusterip", "probe", "-n", namespace, "--tcp=80:80"],
    )


def test_restart_in_the_middle_of_a_reconcile_converges_without_duplicates(
    operator: Operator, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    with _blocking_service_creation(control_plane, namespace):
        _apply(control_plane, "rs", namespace, {})
        # Everything before the Service is applied; the Service fails and is retried.
        half = _wait(
            lambda: (found := _children(kube, namespace, "rs"))["Deployment"] and found,
            operator,
            "the Deployment",
        )
        assert half["Service"] is None
        secret = _secret_data(kube, namespace, "rs")
        uids = {kind: obj["metadata"]["uid"] for kind, obj in half.items() if obj}
        operator.kill()
    operator.start()

    after = _wait(lambda: _all_children(kube, namespace, "rs"), operator, "the Service")
    _wait(lambda: _converged(kube, namespace, "rs"), operator, "status")
    assert {kind: after[kind]["metadata"]["uid"] for kind in uids} == uids
    assert _secret_data(kube, namespace, "rs") == secret
    # No duplicates: every labelled object of a kind is one of the names Berth gives it
    # (the Registry's Secrets also include the policy and robots Secrets of its access).
    selector = f"{names.REGISTRY_LABEL}=rs"
    allowed = {kind: {name_of("rs")} for _, kind, name_of in CHILDREN}
    allowed["Secret"] |= {
        names.policy_secret("rs"),
        names.policy_shard_secret("rs", 0),
        names.robots_secret("rs"),
        names.replication_secret("rs"),
        names.serving_secret("rs"),
        names.serving_ca_secret("rs"),
    }
    for api_version, kind, name_of in CHILDREN:
        listed = [o["metadata"]["name"] for o in kube.list(api_version, kind, namespace, selector)]
        assert name_of("rs") in listed and set(listed) <= allowed[kind], (kind, listed)
    replica_sets = control_plane.kubectl_json(
        "get", "replicasets", "-n", namespace, "-l", "app.kubernetes.io/instance=rs"
    )["items"]
    assert len(replica_sets) == 1  # the Deployment's pod template never changed


# --- the rendered pod really serves ------------------------------------------------------


def test_rendered_pod_serves_push_and_pull(
    operator: Operator,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
) -> None:
    require_tool("skopeo")
    receiver = Receiver()  # a webhook, with a token from a Secret the pod mounts
    control_plane.kubectl(
        "create", "secret", "generic", "hook-headers", "-n", namespace,
        "--from-literal=Authorization=Bearer hook-token",
    )  # fmt: skip
    hooks = {"endpoints": [
        {"name": "audit", "url": receiver.url, "headersSecretRef": {"name": "hook-headers"}}
    ]}  # fmt: skip
    _apply(control_plane, "served", namespace, {"notifications": hooks})
    children = _wait(lambda: _all_children(kube, namespace, "served"), operator, "children")
    config_maps, secrets = _wait(
        lambda: podspec_runner.inputs(
            lambda kind, ns, name: kube.find("v1", kind, ns, name),
            namespace,
            children["Deployment"],
        ),
        operator,
        "the ConfigMaps and Secrets the pod reads",
    )
    pod = podspec_runner.start(children["Deployment"], config_maps, secrets, tmp_path / "pod")
    try:
        secret = _secret_data(kube, namespace, "served")
        creds = f"{secret['admin-username']}:{secret['admin-password']}"
        source, back = tmp_path / "source", tmp_path / "back"
        digest = make_oci_layout(source, "v1", layers=2)
        remote = f"docker://{pod.host}/team-a/api:v1"
        # HTTPS with the generated certificate, verified against the Registry's CA.
        assert pod.url.startswith("https://")
        certs = pod.cert_dir(tmp_path / "certs")
        skopeo(
            "copy", f"--dest-cert-dir={certs}", f"--dest-creds={creds}", f"oci:{source}:v1", remote
        )
        skopeo("copy", f"--src-cert-dir={certs}", f"--src-creds={creds}", remote, f"oci:{back}:v1")
        assert tagged_digest(back, "v1") == digest
        untrusted = skopeo("inspect", "--raw", f"--creds={creds}", remote, check=False)
        assert untrusted.returncode != 0 and "certificate" in untrusted.stderr, untrusted.stderr
        anonymous = skopeo("inspect", "--raw", f"--cert-dir={certs}", remote, check=False)
        assert anonymous.returncode != 0
        assert "unauthorized" in anonymous.stderr.lower() or "denied" in anonymous.stderr.lower()
        # The data landed where the pod's claim is mounted.
        assert any(pod.mounts["/var/lib/berth"].rglob("*"))
        (pushed,) = _wait(receiver.events, operator, "the webhook's push event")
        assert pushed["target"]["digest"] == digest and pushed["target"]["tag"] == "v1"
        assert pushed["actor"] == {"name": secret["admin-username"]}
        assert receiver.envelopes[0][0]["Authorization"] == "Bearer hook-token"
    except BaseException:
        print(pod.log_tail())
        raise
    finally:
        pod.stop()
        receiver.close()


# --- how fast -----------------------------------------------------------------------------


def test_time_from_apply_to_all_children(
    operator: Operator,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Median over 20 Registries of `kubectl apply` -> all five children readable."""
    samples = []
    for i in range(20):
        name = f"lat-{i:02d}"
        started = time.monotonic()
        _apply(control_plane, name, namespace, {})
        _wait(lambda name=name: _all_children(kube, namespace, name), operator, name)
        samples.append(time.monotonic() - started)
    median = statistics.median(samples)
    record_property("apply_to_children_median_seconds", round(median, 3))
    print(
        f"\napply -> all children: median {median:.3f}s, "
        f"min {min(samples):.3f}s, max {max(samples):.3f}s over {len(samples)}"
    )
