"""The Helm chart: lint, template, values schema, and the real API server's verdict.

`helm` is the CLI built from its Go module by `make tools`. The server-side dry runs
send the rendered chart and manifests/ to the session's kube-apiserver, which checks
them against its schemas and admission without storing anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth_dev import generate
from registry_operator import __main__ as operator_main
from registry_operator import credentials, models, rendering
from tests.support.control_plane import ControlPlane
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)

# Values that switch on every optional branch of the templates.
EVERY_OPTION = [
    "--set-string=image.digest=sha256:" + "ab" * 32,
    "--set=imagePullSecrets[0].name=pull",
    "--set=registryImage=mirror.example.com/berth:0.1.0",
    "--set=operator.verbose=true",
    "--set=operator.extraArgs[0]=--resync-seconds=60",
    "--set=serviceAccount.annotations.example\\.com/role=operator",
    "--set=commonLabels.team=platform",
    "--set=podLabels.tier=control",
    "--set-string=podAnnotations.example\\.com/scrape=false",
    "--set=priorityClassName=system-cluster-critical",
    "--set=nodeSelector.kubernetes\\.io/os=linux",
    "--set=tolerations[0].key=dedicated",
    "--set=tolerations[0].operator=Exists",
    "--set=affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms[0].matchExpressions[0].key=kubernetes.io/arch",
    "--set=affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
]


# Helm's own state (repository cache, registry logins) stays out of the home directory.
HELM_HOME = Path(tempfile.gettempdir()) / "berth-test-helm"
HELM_ENV = {
    **os.environ,
    "HELM_CACHE_HOME": str(HELM_HOME / "cache"),
    "HELM_CONFIG_HOME": str(HELM_HOME / "config"),
    "HELM_DATA_HOME": str(HELM_HOME / "data"),
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(require_tool("helm")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=HELM_ENV,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def template(namespace: str = "berth-system", *values: str) -> str:
    return helm(
        "template", "berth", str(generate.CHART_DIR), "--namespace", namespace, *values
    ).stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objects: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def test_lint_strict() -> None:
    result = helm("lint", "--strict", str(generate.CHART_DIR))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_lint_strict_with_every_option() -> None:
    helm("lint", "--strict", str(generate.CHART_DIR), *EVERY_OPTION)


def test_objects_and_recommended_labels() -> None:
    objects = documents(template())
    assert sorted(o["kind"] for o in objects) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "ServiceAccount",
    ]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{obj['kind']} lacks {missing}"
        assert labels["app.kubernetes.io/version"] == importlib.metadata.version("berth")
    pod_labels = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(label in pod_labels for label in RECOMMENDED_LABELS)


def test_operator_deployment() -> None:
    objects = documents(template())
    deployment = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == by_kind(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = operator_container(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The chart's arguments are ones the operator's own parser accepts...
    assert container["command"] == ["python", "-m", "registry_operator"]
    args = operator_main.parse_args(container["args"])
    assert not args.standalone and not args.namespaces  # cluster-wide, with peering
    # ...and the liveness probe asks the very endpoint Kopf serves.
    scheme, _, rest = args.liveness.partition("://")
    host_port, _, path = rest.partition("/")
    port = int(host_port.rpartition(":")[2])
    assert scheme == "http" and host_port.startswith("0.0.0.0:")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"liveness": port}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": f"/{path}", "port": "liveness"}


def test_operator_and_servers_share_the_image_version() -> None:
    """Default values: the operator runs the image of its version and hands it to the
    Registries, which is also what the operator would choose by itself."""
    container = operator_container(documents(template()))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == models.default_image()
    assert env["BERTH_REGISTRY_IMAGE"] == models.default_image()
    chart = yaml.safe_load((generate.CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == importlib.metadata.version("berth")


def test_image_overrides_follow_through_to_the_servers() -> None:
    digest = "sha256:" + "cd" * 32
    container = operator_container(
        documents(template("berth-system", f"--set-string=image.digest={digest}"))
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == f"{models.DEFAULT_IMAGE_REPOSITORY}@{digest}"
    assert env["BERTH_REGISTRY_IMAGE"] == container["image"]
    mirror = "mirror.example.com/berth:0.1.0"
    container = operator_container(
        documents(template("berth-system", f"--set=registryImage={mirror}"))
    )
    assert {e["name"]: e["value"] for e in container["env"]}["BERTH_REGISTRY_IMAGE"] == mirror


def test_without_own_service_account_or_rbac() -> None:
    objects = documents(
        template(
            "berth-system",
            "--set=serviceAccount.create=false",
            "--set=serviceAccount.name=platform-operator",
            "--set=rbac.create=false",
        )
    )
    assert [o["kind"] for o in objects] == ["Deployment"]
    pod = objects[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"
    refused = helm(
        "template",
        "berth",
        str(generate.CHART_DIR),
        "--set=serviceAccount.create=false",
        check=False,
    )
    assert refused.returncode != 0
    assert "serviceAccount.name is required" in refused.stderr


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("--set=image.pullPolicy=Sometimes", "pullPolicy"),
        ("--set=operator.livenessPort=0", "livenessPort"),
        ("--set=operator.resyncSeconds=0", "resyncSeconds"),
        ("--set=replicaCount=2", "replicaCount"),
        ("--set=operator.verbose=yes please", "verbose"),
        ("--set-string=image.digest=latest", "digest"),
        ("--set=serviceMonitor.interval=soon", "interval"),
    ],
)
def test_values_schema_refuses(value: str, complaint: str) -> None:
    refused = helm("template", "berth", str(generate.CHART_DIR), value, check=False)
    assert refused.returncode != 0, f"{value} was accepted"
    assert "values don't meet the specifications of the schema" in refused.stderr
    assert complaint in refused.stderr


def test_service_monitor_scrapes_the_registries_metrics_port() -> None:
    """Off by default; when on, it selects exactly the Services the operator renders for
    Registries, on the port that serves /metrics (and that no Ingress routes)."""
    assert "ServiceMonitor" not in {o["kind"] for o in documents(template())}
    objects = documents(
        template(
            "berth-system",
            "--set=serviceMonitor.enabled=true",
            "--set=serviceMonitor.namespaces[0]=registries",
            "--set=serviceMonitor.labels.release=prometheus",
        )
    )
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["registries"]}
    owner = models.Owner(name="main", namespace="registries", uid="uid-1")
    spec = models.parse_spec({"ingress": {"host": "r.example.com"}}, image="berth:test")
    admin = credentials.User("admin", "pw", "$2b$10$hash")
    stand_in = credentials.Credentials("not-a-key", admin, admin)
    rendered = rendering.render(spec, owner, stand_in, node_port=5605)
    service = next(d for d in rendered if d["kind"] == "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    # Not the node proxy, the only other workload of a Registry.
    proxy = next(d for d in rendered if d["kind"] == "DaemonSet")
    assert not selector.items() <= proxy["metadata"]["labels"].items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    ingress = next(d for d in rendered if d["kind"] == "Ingress")
    routed = {
        p["backend"]["service"]["port"]["name"]
        for p in ingress["spec"]["rules"][0]["http"]["paths"]
    }
    assert endpoint["port"] not in routed


def test_install_upgrade_uninstall(control_plane: ControlPlane, namespace: str) -> None:
    """A real `helm install` (no kubelet: the operator pod stays Pending), its NOTES,
    an upgrade with the same values, and an uninstall that leaves nothing behind."""
    release = f"berth-{namespace[-6:]}"
    kube = ["--kubeconfig", str(control_plane.kubeconfig), "--namespace", namespace]
    installed = helm("install", release, str(generate.CHART_DIR), *kube).stdout
    assert f"kubectl -n {namespace} rollout status deployment/{release}" in installed
    assert models.default_image() in installed
    deployment = control_plane.kubectl_json("get", "deployment", release, "-n", namespace)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/instance"] == release
    before = control_plane.kubectl_json("get", "clusterrole", release)["metadata"]
    helm("upgrade", release, str(generate.CHART_DIR), *kube)
    after = control_plane.kubectl_json("get", "clusterrole", release)["metadata"]
    assert after["resourceVersion"] == before["resourceVersion"]
    helm("uninstall", release, *kube)
    gone = control_plane.kubectl("get", "clusterrole", release, check=False)
    assert "NotFound" in gone.stderr
    # CRDs stay: Helm never deletes them (their custom resources would go with them).
    control_plane.kubectl("get", "crd", "registries.berth.dev")


# --- the real API server ------------------------------------------------------------


@pytest.fixture
def cleanup_namespaces(control_plane: ControlPlane) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def dry_run(plane: ControlPlane, *args: str, input: str | None = None) -> str:
    result = plane.kubectl("apply", "--dry-run=server", *args, input=input, check=False)
    assert result.returncode == 0, f"the API server refused:\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("values", [[], EVERY_OPTION], ids=["defaults", "every-option"])
def test_chart_accepted_by_the_api_server(
    control_plane: ControlPlane, namespace: str, values: list[str]
) -> None:
    rendered = helm(
        "template",
        "berth",
        str(generate.CHART_DIR),
        "--namespace",
        namespace,
        "--include-crds",
        *values,
    ).stdout
    out = dry_run(control_plane, "-f", "-", input=rendered)
    for kind in ("serviceaccount", "clusterrole", "clusterrolebinding", "deployment"):
        assert f"{kind}.rbac" in out or f"{kind}.apps" in out or f"{kind}/" in out, out
    assert "customresourcedefinition.apiextensions.k8s.io/registries.berth.dev" in out


def test_manifests_accepted_by_the_api_server(
    control_plane: ControlPlane, cleanup_namespaces: list[str]
) -> None:
    # A dry run does not create the Namespace, so the objects in it would have none.
    control_plane.kubectl("create", "namespace", generate.NAMESPACE)
    cleanup_namespaces.append(generate.NAMESPACE)
    out = dry_run(control_plane, "-k", str(generate.MANIFESTS_DIR))
    assert "deployment.apps/berth created (server dry run)" in out
    out = dry_run(control_plane, "-f", str(generate.MANIFESTS_DIR / "install.yaml"))
    assert "clusterrole.rbac.authorization.k8s.io/berth created (server dry run)" in out


def test_manifests_are_the_chart_rendered() -> None:
    problems = generate.drift(generate.manifests(), generate.OWNED_DIRS["manifests"])
    assert not problems, "\n".join(problems) + "\nrun: python -m berth_dev.generate manifests"


def test_kustomize_builds_the_same_objects(control_plane: ControlPlane) -> None:
    built = control_plane.kubectl("kustomize", str(generate.MANIFESTS_DIR)).stdout
    installed = documents((generate.MANIFESTS_DIR / "install.yaml").read_text())

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(map(key, documents(built))) == sorted(map(key, installed))
