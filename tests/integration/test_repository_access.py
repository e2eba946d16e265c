"""Repositories on a real control plane, end to end with the server the operator rendered.

The operator runs as a process against etcd + kube-apiserver + kube-controller-manager.
The registry server runs from the Deployment, ConfigMap and Secrets the operator wrote
(tests/support/podspec_runner.py), and a thread stands in for the kubelet's sync loop:
it re-materialises changed ConfigMaps and Secrets into the same volume directories with
the kubelet's atomic symlink swap, so the running server reloads the policy on its own,
as in a cluster. The operator reaches the server through an endpoint overrides file (no
Service networking here). Every credential is read from the `.dockerconfigjson` of the
Secret the operator wrote and used with skopeo.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.integration.test_auth_clients import SECRETS as UPSTREAM_SECRETS
from tests.integration.test_auth_clients import creds as upstream_creds
from tests.integration.test_auth_clients import start_auth_registry
from tests.support import podspec_runner
from tests.support.clients import skopeo
from tests.support.control_plane import ControlPlane
from tests.support.images import make_oci_layout, tagged_digest
from tests.support.operator_process import CleanupWarning, OperatorProcess, operator_running
from tests.support.operator_process import wait_for as _wait
from tests.support.processes import RegistryProcess
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"
PULL_LABEL = "berth.dev/pull"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, overrides: Path
) -> Iterator[OperatorProcess]:
    with operator_running(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        "--resync-seconds=60",
        "--credential-propagation-seconds=60",
        f"--endpoint-overrides={overrides}",
    ) as running:
        yield running


@pytest.fixture
def pods() -> Iterator[list[podspec_runner.RunningPod]]:
    started: list[podspec_runner.RunningPod] = []
    try:
        yield started
    finally:
        for pod in started:
            pod.stop()


@pytest.fixture
def namespaces(control_plane: ControlPlane) -> Iterator[Callable[..., str]]:
    """Factory for extra namespaces (with labels), deleted after the test."""
    created: list[str] = []

    def create(prefix: str, **labels: str) -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        document = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(document))
        created.append(name)
        return name

    try:
        yield create
    finally:
        if created:
            control_plane.kubectl(
                "delete", "namespace", *created, "--wait=false", "--ignore-not-found", check=False
            )


# --- helpers ------------------------------------------------------------------------------


def _apply(
    plane: ControlPlane, kind: str, name: str, namespace: str, spec: dict[str, Any], **meta: Any
) -> None:
    document = {
        "apiVersion": API,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(document))


def _registry_pod(
    plane: ControlPlane,
    kube: kube_client.Client,
    operator: OperatorProcess,
    overrides: Path,
    namespace: str,
    root: Path,
    pods: list[podspec_runner.RunningPod],
    spec: dict[str, Any] | None = None,
) -> podspec_runner.RunningPod:
    """Apply a Registry `main` (``spec``, else an emptyDir), start its pod as the kubelet
    would and keep its volumes current; the operator is told where it serves."""
    _apply(plane, "Registry", "main", namespace, spec or {"storage": {"emptyDir": {}}})
    deployment = _wait(
        lambda: kube.find("apps/v1", "Deployment", namespace, "main"), operator, "Deployment"
    )

    def fetch() -> tuple[list[Any], list[Any]] | None:
        return podspec_runner.inputs(
            lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, deployment
        )

    config_maps, secrets_ = _wait(fetch, operator, "the pod's ConfigMaps and Secrets")
    pod = podspec_runner.start(
        deployment,
        config_maps,
        secrets_,
        root,
        fetch=lambda: fetch() or ([], []),
        follow_interval=0.5,
    )
    pods.append(pod)
    mapping = json.loads(overrides.read_text())
    mapping[f"{namespace}/main"] = pod.url
    temporary = overrides.with_suffix(".tmp")
    temporary.write_text(json.dumps(mapping))
    temporary.rename(overrides)
    return pod


def _admin(kube: kube_client.Client, namespace: str) -> str:
    secret = kube.get("v1", "Secret", namespace, names.secret("main"))
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return f"{data['admin-username']}:{data['admin-password']}"


def _push(pod: podspec_runner.RunningPod, creds: str, source: Path, path: str, seed: str) -> str:
    digest = make_oci_layout(source / seed, "v1", seed=seed)
    skopeo(
        "copy", "--dest-tls-verify=false", f"--dest-creds={creds}", f"oci:{source / seed}:v1",
        f"docker://{pod.host}/{path}:v1",
    )  # fmt: skip
    return digest


def _pull_secret(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any] | None:
    return kube.find("v1", "Secret", namespace, name)


def _credentials(secret: dict[str, Any], host: str) -> tuple[str, str]:
    """The username and password in a dockerconfigjson Secret, for `host` (the Service);
    the only other key is the node proxy's localhost:<port>, with the same credential."""
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    auths = config["auths"]
    assert host in auths, "auths must be keyed by the registry's endpoints"
    assert all(key == host or key.startswith("localhost:") for key in auths), list(auths)
    entry = auths[host]
    assert all(other == entry for other in auths.values())
    assert base64.b64decode(entry["auth"]).decode() == f"{entry['username']}:{entry['password']}"
    return entry["username"], entry["password"]


def _basic_status(pod: podspec_runner.RunningPod, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{pod.url}/v2/", headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5, context=pod.context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _mounted_policy(pod: podspec_runner.RunningPod) -> str:
    """The mounted policy's text: the main file and its (gzipped) shards."""
    directory = pod.mounts["/etc/berth/policy"]
    texts = [(directory / "policy.yaml").read_text()]
    texts += [gzip.decompress(p.read_bytes()).decode() for p in sorted(directory.glob("*.gz"))]
    return "\n".join(texts)


def _accepted(
    pod: podspec_runner.RunningPod, creds: tuple[str, str], operator: OperatorProcess
) -> None:
    """Wait until the server accepts `creds`, without tripping its rate limit for failed
    logins (10 a minute per client): first until the kubelet stand-in has the account in
    the mounted policy file, then a login a second while the server reloads it."""
    _wait(lambda: creds[0] in _mounted_policy(pod), operator, f"{creds[0]} in the pod's policy")
    # The server takes a new file after two polls a second apart that agree: give it that
    # time before the first login, so that a slow reload costs no failed attempts.
    time.sleep(2.5)

    def accepted() -> bool:
        if _basic_status(pod, *creds) == 200:
            return True
        time.sleep(1)
        return False

    _wait(accepted, operator, f"the server to accept {creds[0]}")


def _pull(pod: podspec_runner.RunningPod, creds: tuple[str, str], path: str, dest: Path) -> Any:
    certs = pod.cert_dir(dest.with_name(f"{dest.name}-certs"))  # the Registry's CA, verified
    return skopeo(
        "copy", f"--src-cert-dir={certs}", f"--src-creds={creds[0]}:{creds[1]}",
        f"docker://{pod.host}/{path}:v1", f"oci:{dest}:v1", check=False,
    )  # fmt: skip


def _pulls_only(
    pod: podspec_runner.RunningPod,
    creds: tuple[str, str],
    granted: str,
    digest: str,
    refused: str,
    tmp_path: Path,
) -> None:
    """``creds`` pull ``granted`` (its v1 is ``digest``) and are refused ``refused``."""
    pulled = _pull(pod, creds, granted, tmp_path / "pulled")
    assert pulled.returncode == 0, pulled.stderr
    assert tagged_digest(tmp_path / "pulled", "v1") == digest
    other = _pull(pod, creds, refused, tmp_path / "other")
    assert other.returncode != 0
    assert "unauthorized" in other.stderr.lower() or "denied" in other.stderr.lower()


def _status(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any]:
    return dict(kube.get(API, "Repository", namespace, name).get("status") or {})


def _conditions(kube: kube_client.Client, namespace: str, name: str) -> dict[str, tuple[str, str]]:
    found = _status(kube, namespace, name).get("conditions") or []
    return {c["type"]: (c["status"], c["reason"]) for c in found}


def _events(plane: ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    found = plane.kubectl_json(
        "get", "events", "-n", namespace,
        "--field-selector", f"involvedObject.kind=Repository,involvedObject.name={name}",
    )  # fmt: skip
    return [(e["type"], e["reason"], e["message"]) for e in found["items"]]


# --- the tests ----------------------------------------------------------------------------


def test_pull_secret_grants_exactly_the_repository_and_revocation_takes_it_back(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    namespaces: Callable[..., str],
    overrides: Path,
    pods: list[podspec_runner.RunningPod],
    tmp_path: Path,
) -> None:
    require_tool("skopeo")
    label = secrets.token_hex(4)
    team_a, team_b = namespaces("team-a"), namespaces("team-b")
    pod = _registry_pod(control_plane, kube, operator, overrides, namespace, tmp_path / "pod", pods)
    admin = _admin(kube, namespace)
    digest = _push(pod, admin, tmp_path / "src", "team-a/api", "api")
    _push(pod, admin, tmp_path / "src", "team-b/web", "web")

    selector = {"matchLabels": {PULL_LABEL: label}}
    _apply(control_plane, "Repository", "team-a-api", namespace, {
        "registryRef": {"name": "main"},
        "path": "team-a/api",
        "pullAccess": {"namespaces": [team_a], "namespaceSelector": selector},
    })  # fmt: skip
    _apply(control_plane, "Repository", "team-b-web", namespace, {
        "registryRef": {"name": "main"},
        "path": "team-b/web",
        "pullAccess": {"namespaces": [team_b]},
    })  # fmt: skip
    secret_name = f"main-{namespace}-pull"
    secret = _wait(lambda: _pull_secret(kube, team_a, secret_name), operator, "the pull Secret")
    creds = _credentials(secret, f"main.{namespace}.svc:5000")
    assert creds[0] == f"pull.{team_a}.1"
    # Kubelets pull through the node proxy: the Secret names the Registry's pull endpoint
    # (absent only if another Registry of the cluster happened to hold the same port).
    pull_endpoint = kube.get(API, "Registry", namespace, "main")["status"].get("pullEndpoint")
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    assert sorted(config["auths"]) == sorted(
        [f"main.{namespace}.svc:5000", *([pull_endpoint] if pull_endpoint else [])]
    )
    # The kubelet stand-in copies the new policy into the pod; the server reloads it.
    _accepted(pod, creds, operator)

    _pulls_only(pod, creds, "team-a/api", digest, "team-b/web", tmp_path)
    push = skopeo(
        "copy", "--dest-tls-verify=false", f"--dest-creds={creds[0]}:{creds[1]}",
        f"oci:{tmp_path / 'src' / 'api'}:v1", f"docker://{pod.host}/team-a/api:v2", check=False,
    )  # fmt: skip
    assert push.returncode != 0
    assert "unauthorized" in push.stderr.lower() or "denied" in push.stderr.lower()

    status = _wait(
        lambda: (
            (s := _status(kube, namespace, "team-a-api")).get("pullSecretNamespaces") == [team_a]
            and s
        ),
        operator,
        "the Repository status",
    )
    assert status["pullSecretName"] == secret_name
    assert _conditions(kube, namespace, "team-a-api")["Ready"] == ("True", "Granted")
    table = control_plane.kubectl("get", "repositories", "-n", namespace).stdout
    assert table.split("\n")[0].split()[:5] == ["NAME", "REGISTRY", "PATH", "VISIBILITY", "READY"]

    # A namespace created later with the label gets its Secret within seconds (a watch).
    started = time.monotonic()
    team_c = namespaces("team-c", **{PULL_LABEL: label})
    later = _wait(
        lambda: _pull_secret(kube, team_c, secret_name),
        operator,
        "the new namespace's Secret",
        timeout=30,
    )
    print(f"\nnamespace created -> pull Secret present: {time.monotonic() - started:.2f}s")
    later_creds = _credentials(later, f"main.{namespace}.svc:5000")
    assert later_creds[0] == f"pull.{team_c}.1" and later_creds != creds
    _accepted(pod, later_creds, operator)
    assert _pull(pod, later_creds, "team-a/api", tmp_path / "later").returncode == 0

    # Revocation: team-a leaves the list. Its Secret goes, then the server refuses the
    # old credential; team-c's is not disturbed.
    _apply(control_plane, "Repository", "team-a-api", namespace, {
        "registryRef": {"name": "main"},
        "path": "team-a/api",
        "pullAccess": {"namespaces": [], "namespaceSelector": selector},
    })  # fmt: skip
    _wait(lambda: _pull_secret(kube, team_a, secret_name) is None, operator, "the Secret to go")
    deadline = time.monotonic() + 30
    while _basic_status(pod, *creds) == 200:  # stops at the first refusal (rate limiting)
        assert time.monotonic() < deadline, "the server still accepts the revoked credential"
        time.sleep(1)
    refused = _pull(pod, creds, "team-a/api", tmp_path / "refused")
    assert refused.returncode != 0
    assert (
        _pull_secret(kube, team_c, secret_name) == later
        or _credentials(_pull_secret(kube, team_c, secret_name) or {}, f"main.{namespace}.svc:5000")
        == later_creds
    )
    assert _pull(pod, later_creds, "team-a/api", tmp_path / "still").returncode == 0
    _wait(
        lambda: (
            {("Granted"), ("Revoked")}
            <= {e[1] for e in _events(control_plane, namespace, "team-a-api")}
        ),
        operator,
        "Granted and Revoked events",
    )


def test_rotation_keeps_every_pull_working(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    namespaces: Callable[..., str],
    overrides: Path,
    pods: list[podspec_runner.RunningPod],
    tmp_path: Path,
) -> None:
    """Pulls run back to back throughout a rotation, each with the credential the Secret
    holds at that moment (as the kubelet reads it for each pull): none fails. A client
    that keeps the old credential keeps working for the overlap, and no longer after."""
    require_tool("skopeo")
    team = namespaces("rot")
    pod = _registry_pod(control_plane, kube, operator, overrides, namespace, tmp_path / "pod", pods)
    _push(pod, _admin(kube, namespace), tmp_path / "src", "team-a/api", "api")
    spec = {
        "registryRef": {"name": "main"},
        "path": "team-a/api",
        "pullAccess": {"namespaces": [team]},
        "rotation": {"overlap": "15s"},
    }
    _apply(control_plane, "Repository", "api", namespace, spec)
    secret_name = f"main-{namespace}-pull"
    host = f"main.{namespace}.svc:5000"
    first = _credentials(
        _wait(lambda: _pull_secret(kube, team, secret_name), operator, "Secret"), host
    )
    _accepted(pod, first, operator)

    failures: list[str] = []
    used: set[str] = set()
    pulls = 0
    stop = threading.Event()

    def keep_pulling() -> None:
        nonlocal pulls
        while not stop.is_set():
            current = _credentials(_pull_secret(kube, team, secret_name) or {}, host)
            used.add(current[0])
            result = _pull(pod, current, "team-a/api", tmp_path / f"pull-{pulls % 2}")
            pulls += 1
            if result.returncode != 0:
                failures.append(f"{current[0]}: {result.stderr.strip()}")

    puller = threading.Thread(target=keep_pulling)
    puller.start()
    try:
        time.sleep(1)
        control_plane.kubectl(
            "annotate", "repository", "api", "-n", namespace, "berth.dev/rotate=now"
        )
        second = _credentials(
            _wait(
                lambda: (
                    (s := _pull_secret(kube, team, secret_name))
                    and _credentials(s, host)[0] != first[0]
                    and s
                ),
                operator,
                "the rotated credential in the Secret",
                timeout=60,
            ),
            host,
        )
        rotated_at = time.monotonic()
        assert second[0] == f"pull.{team}.2"
        # Handed out only once the server had it, and the old one still works.
        assert _basic_status(pod, *second) == 200
        assert _basic_status(pod, *first) == 200
        # Two more pulls done: the second of them read the Secret after the rotation.
        seen = pulls
        _wait(
            lambda: second[0] in used and pulls >= seen + 2,
            operator,
            "pulls with the new credential",
            timeout=120,
        )
    finally:
        stop.set()
        puller.join(timeout=120)
    assert failures == [], failures
    assert {first[0], second[0]} <= used, used
    print(f"\n{pulls} pulls during the rotation, none failed")

    annotations = kube.get(API, "Repository", namespace, "api")["metadata"].get("annotations") or {}
    assert "berth.dev/rotate" not in annotations
    assert _status(kube, namespace, "api").get("credentialsRotatedAt")
    # The old credential keeps working for the overlap (15 s), then the server drops it.
    while time.monotonic() < rotated_at + 12:
        assert _basic_status(pod, *first) == 200, "the old credential stopped before its overlap"
        time.sleep(2)
    deadline = time.monotonic() + 30
    while _basic_status(pod, *first) == 200:
        assert time.monotonic() < deadline, "the old credential was never dropped"
        time.sleep(1)
    assert _basic_status(pod, *second) == 200
    _wait(
        lambda: _conditions(kube, namespace, "api").get("Rotating") == ("False", "Idle"),
        operator,
        "Idle",
    )
    assert "Rotated" in {e[1] for e in _events(control_plane, namespace, "api")}


def test_a_repository_quota_is_enforced_and_its_usage_reported(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    overrides: Path,
    pods: list[podspec_runner.RunningPod],
    tmp_path: Path,
) -> None:
    """spec.quota reaches the server's policy and holds pushes there; the server's usage
    comes back into status.usage, the printer columns and QuotaExceeded."""
    require_tool("skopeo")
    pod = _registry_pod(control_plane, kube, operator, overrides, namespace, tmp_path / "pod", pods)
    admin = _admin(kube, namespace)
    spec: dict[str, Any] = {
        "registryRef": {"name": "main"},
        "path": "team-q/app",
        "quota": {"storage": "10Ki", "tags": 5},
    }
    _apply(control_plane, "Repository", "quota-app", namespace, spec)
    _wait(lambda: "quota" in _mounted_policy(pod), operator, "the quota in the pod's policy")
    time.sleep(2.5)  # the server takes a new policy after two polls a second apart

    def push(seed: str) -> Any:
        source = tmp_path / "src" / seed
        make_oci_layout(source, "v1", layer_size=4096, seed=seed)
        return skopeo(
            "copy", "--dest-tls-verify=false", f"--dest-creds={admin}",
            f"oci:{source}:v1", f"docker://{pod.host}/team-q/app:{seed}", check=False,
        )  # fmt: skip

    # About 4.6 KiB an image: two fit in 10 KiB, a third does not.
    assert push("one").returncode == 0 and push("two").returncode == 0
    refused = push("three")
    assert refused.returncode != 0 and "quota exceeded" in refused.stderr, refused.stderr
    token = base64.b64encode(admin.encode()).decode()
    request = urllib.request.Request(
        f"{pod.url}/berth/v1/usage?repository=team-q/app",
        headers={"Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=5, context=pod.context) as response:
        served = json.loads(response.read())
    assert served["tags"] == 2 and 8 * 1024 < served["storage"] <= 10 * 1024, served

    def reported() -> dict[str, Any] | None:
        # Figures from a poll before the pushes (zeros) may come first: wait for these.
        usage = _status(kube, namespace, "quota-app").get("usage") or {}
        return usage if usage.get("tags") == 2 else None

    usage = _wait(reported, operator, "status.usage after the pushes", timeout=60)
    assert usage["storageBytes"] == served["storage"] and usage["tags"] == 2, usage
    assert usage["manifests"] == 2 and usage["storage"].endswith("Ki")
    assert _conditions(kube, namespace, "quota-app")["QuotaExceeded"] == ("False", "WithinQuota")
    table = control_plane.kubectl("get", "repositories", "-n", namespace, "quota-app")
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[5:7] == ["STORED", "QUOTA"], header
    assert row.split()[5:7] == [usage["storage"], "10Ki"], row

    # A lower quota: the repository is now at it.
    _apply(control_plane, "Repository", "quota-app", namespace, {
        **spec, "quota": {"storage": "8Ki"},
    })  # fmt: skip
    _wait(
        lambda: (
            _conditions(kube, namespace, "quota-app").get("QuotaExceeded")
            == ("True", "StorageQuotaReached")
        ),
        operator,
        "QuotaExceeded",
    )


def test_conflicting_paths_are_reported_on_both(
    operator: OperatorProcess, kube: kube_client.Client, control_plane: ControlPlane, namespace: str
) -> None:
    _apply(control_plane, "Registry", "main", namespace, {"storage": {"emptyDir": {}}})
    _apply(
        control_plane,
        "Repository",
        "first",
        namespace,
        {"registryRef": {"name": "main"}, "path": "shared/app"},
    )
    _wait(lambda: _conditions(kube, namespace, "first").get("Ready"), operator, "first's status")
    time.sleep(1.1)  # creationTimestamp has one-second resolution
    _apply(
        control_plane,
        "Repository",
        "second",
        namespace,
        {"registryRef": {"name": "main"}, "path": "shared/app"},
    )
    _wait(
        lambda: _conditions(kube, namespace, "second").get("Ready") == ("False", "PathConflict"),
        operator,
        "the newer claim to be refused",
    )
    assert _conditions(kube, namespace, "second")["PathConflict"] == ("True", "PathHeldByOther")
    _wait(
        lambda: _conditions(kube, namespace, "first").get("PathConflict") == ("True", "KeepsPath"),
        operator,
        "the older claim to be told",
    )
    assert _conditions(kube, namespace, "first")["Ready"] == ("True", "Granted")
    message = next(
        c["message"]
        for c in _status(kube, namespace, "second")["conditions"]
        if c["type"] == "PathConflict"
    )
    assert "held by Repository first, which is older" in message
    _wait(
        lambda: (
            ("Warning", "PathConflict")
            in {(e[0], e[1]) for e in _events(control_plane, namespace, "second")}
        ),
        operator,
        "a Warning event",
    )
    # The older one goes: the other takes the path over.
    control_plane.kubectl("delete", "repository", "first", "-n", namespace)
    _wait(
        lambda: _conditions(kube, namespace, "second").get("Ready") == ("True", "Granted"),
        operator,
        "the path to pass to the remaining claim",
    )


def test_service_accounts_and_registry_deletion(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    namespaces: Callable[..., str],
) -> None:
    team = namespaces("sa")
    # The serviceaccount controller creates `default`; a user adds an entry of their own.
    _wait(lambda: kube.find("v1", "ServiceAccount", team, "default"), operator, "the default SA")
    control_plane.kubectl(
        "patch", "serviceaccount", "default", "-n", team, "--type=merge",
        "-p", json.dumps({"imagePullSecrets": [{"name": "their-own"}]}),
    )  # fmt: skip
    _apply(control_plane, "Registry", "main", namespace, {"storage": {"emptyDir": {}}})
    _apply(control_plane, "Repository", "api", namespace, {
        "registryRef": {"name": "main"}, "path": "team/api",
        "pullAccess": {
            "namespaces": [team], "serviceAccounts": ["default"], "secretName": "registry-pull"
        },
    })  # fmt: skip

    def entries() -> list[str]:
        account = kube.get("v1", "ServiceAccount", team, "default")
        return [e["name"] for e in account.get("imagePullSecrets") or []]

    _wait(lambda: entries() == ["their-own", "registry-pull"], operator, "the SA entry")
    assert _pull_secret(kube, team, "registry-pull") is not None

    # Deleting the Registry removes what it wrote outside its namespace, and only that.
    control_plane.kubectl("delete", "registry", "main", "-n", namespace, timeout=60)
    _wait(lambda: _pull_secret(kube, team, "registry-pull") is None, operator, "the Secret to go")
    assert entries() == ["their-own"]
    _wait(
        lambda: _conditions(kube, namespace, "api").get("Ready", ("", ""))[1] == "RegistryNotFound",
        operator,
        "the Repository to say so",
    )


class RssSampler:
    """The operator's resident memory, sampled every 50 ms in a thread."""

    def __init__(self, operator: OperatorProcess) -> None:
        self.operator = operator
        self.before = operator.rss_kib()[0]
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.operator.rss_kib()[0])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _namespaces(prefix: str, start: int, count: int, label: str) -> str:
    items = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": f"{prefix}-{i:04d}", "labels": {PULL_LABEL: label}},
        }
        for i in range(start, start + count)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def test_fan_out_to_namespaces(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Pull Secrets for 200 labelled namespaces (BERTH_FANOUT_NAMESPACES), two ways, with
    the operator's memory:

    1. a Repository applied while the namespaces exist: `kubectl apply` of the
       Repository until all their Secrets exist;
    2. as many namespaces again created at once while the Repository exists (the
       namespace watch): the start of their `kubectl apply` until all Secrets exist.
    """
    count = int(os.environ.get("BERTH_FANOUT_NAMESPACES", "200"))
    label = secrets.token_hex(4)
    prefix = f"fan-{label}"
    _apply(control_plane, "Registry", "main", namespace, {"storage": {"emptyDir": {}}})
    _wait(
        lambda: kube.find("v1", "Secret", namespace, names.policy_secret("main")),
        operator,
        "policy",
    )
    control_plane.kubectl(
        "apply", "-f", "-", input=_namespaces(prefix, 0, count, label), timeout=120
    )
    selector = names.access_selector("main", namespace)

    def secrets_present(total: int) -> bool:
        return len(kube.list("v1", "Secret", None, selector)) >= total

    try:
        time.sleep(2)  # let the namespace events settle: measure the fan-out, not the creation
        sampler = RssSampler(operator)
        started = time.monotonic()
        _apply(control_plane, "Repository", "fan", namespace, {
            "registryRef": {"name": "main"},
            "path": "fan/out",
            "pullAccess": {"namespaceSelector": {"matchLabels": {PULL_LABEL: label}}},
        })  # fmt: skip
        _wait(lambda: secrets_present(count), operator, f"{count} pull Secrets", timeout=600)
        by_repository = time.monotonic() - started
        status = _wait(
            lambda: (
                len((s := _status(kube, namespace, "fan")).get("pullSecretNamespaces") or [])
                == count
                and s
            ),
            operator,
            "the status to list them",
            timeout=60,
        )
        assert status["pullSecretNamespaces"][0] == f"{prefix}-0000"

        started = time.monotonic()
        control_plane.kubectl(
            "apply", "-f", "-", input=_namespaces(prefix, count, count, label), timeout=600
        )
        created = time.monotonic() - started
        _wait(
            lambda: secrets_present(2 * count),
            operator,
            "Secrets in 200 new namespaces",
            timeout=180,
        )
        by_watch = time.monotonic() - started
        sampler.stop()
        rss_after, hwm = operator.rss_kib()
        record_property("fan_out_namespaces", count)
        record_property("fan_out_repository_seconds", round(by_repository, 2))
        record_property("fan_out_new_namespaces_seconds", round(by_watch, 2))
        record_property("operator_rss_peak_mib", round(sampler.peak / 1024, 1))
        print(
            f"\nRepository applied -> Secrets in {count} namespaces: {by_repository:.2f}s"
            f"\n{count} namespaces created -> their Secrets (namespace watch): {by_watch:.2f}s"
            f" (kubectl apply of the namespaces alone: {created:.2f}s)"
            f"\noperator RSS {sampler.before / 1024:.1f} MiB before, peak "
            f"{sampler.peak / 1024:.1f} MiB during, {rss_after / 1024:.1f} MiB after "
            f"(process high-water mark {hwm / 1024:.1f} MiB)"
        )
    finally:
        control_plane.kubectl(
            "delete", "repository", "fan", "-n", namespace, "--ignore-not-found", check=False
        )
        control_plane.kubectl(
            "delete",
            "namespace",
            "-l",
            f"{PULL_LABEL}={label}",
            "--wait=false",
            check=False,
            timeout=600,
        )
        # Hundreds of namespaces terminating in the background would load the control
        # plane under the modules that follow: wait (bounded) until they are gone.
        deleting = time.monotonic()
        left = control_plane.wait_gone("namespaces", "-l", f"{PULL_LABEL}={label}", timeout=300)
        if left:
            warnings.warn(
                f"{len(left)} fan-out namespaces still there after 300s", CleanupWarning, 1
            )
        print(f"{2 * count} namespaces deleted: {time.monotonic() - deleting:.1f}s")


def test_a_granted_namespace_pulls_a_mirrored_path_through_the_cache(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    namespaces: Callable[..., str],
    overrides: Path,
    pods: list[podspec_runner.RunningPod],
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
) -> None:
    """A Repository grants a namespace pull access to a path of a pull-through cache like
    to any other: its pull Secret fetches the upstream's image through the rendered pod,
    and gets nothing outside the granted path."""
    upstream = start_auth_registry(registry_process, tmp_path / "upstream")
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, "v1", layers=2, layer_size=40_000)
    skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", upstream_creds("ci"),
        f"oci:{layout}:v1", f"docker://{upstream.host}/team-a/api:v1",
    )  # fmt: skip
    token = base64.b64encode(UPSTREAM_SECRETS["ci"].encode()).decode()
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "upstream-token", "namespace": namespace},
        "data": {"token": token},
    }))  # fmt: skip
    spec = {
        "storage": {"emptyDir": {}},
        "upstreams": [{
            "name": "corp", "url": upstream.process.url, "prefix": "mirror", "username": "ci",
            "passwordSecretRef": {"name": "upstream-token", "key": "token"},
        }],
    }  # fmt: skip
    team_a = namespaces("team-a")
    pod = _registry_pod(
        control_plane, kube, operator, overrides, namespace, tmp_path / "pod", pods, spec
    )
    _apply(control_plane, "Repository", "mirror-team-a", namespace, {
        "registryRef": {"name": "main"},
        "path": "mirror/team-a/**",
        "pullAccess": {"namespaces": [team_a]},
    })  # fmt: skip
    secret_name = f"main-{namespace}-pull"
    secret = _wait(lambda: _pull_secret(kube, team_a, secret_name), operator, "the pull Secret")
    creds = _credentials(secret, f"main.{namespace}.svc:5000")
    _accepted(pod, creds, operator)

    # Outside the grant: refused (that nothing is asked of the upstream then is proven
    # with a counting upstream in test_pull_through_upstreams.py).
    _pulls_only(pod, creds, "mirror/team-a/api", digest, "mirror/team-b/web", tmp_path)
