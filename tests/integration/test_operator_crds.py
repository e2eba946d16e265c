"""The CRDs on a real kube-apiserver: defaults, and invalid specs refused by schema and CEL.

No operator runs here: this is what `kubectl apply` answers before any controller sees
the object. Messages are compared exactly, as a user reads them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.control_plane import ControlPlane
from tests.support.tools import REPO_ROOT

pytestmark = pytest.mark.integration


def _registry(name: str, namespace: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Registry",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def _apply(plane: ControlPlane, document: str, *extra: str) -> tuple[int, str]:
    result = plane.kubectl("apply", "-f", "-", *extra, input=document, check=False)
    return result.returncode, result.stderr.strip()


def test_defaults_are_filled_in(control_plane: ControlPlane, namespace: str) -> None:
    code, err = _apply(control_plane, _registry("plain", namespace, {}))
    assert code == 0, err
    spec = control_plane.kubectl_json("get", "registry", "plain", "-n", namespace)["spec"]
    assert spec == {
        "replicas": 1,
        "imagePullPolicy": "IfNotPresent",
        "logLevel": "info",
        "storage": {
            "pvc": {
                "size": "10Gi",
                "accessModes": ["ReadWriteOnce"],
                "deleteOnRegistryDelete": False,
            }
        },
        "nodeProxy": {"enabled": True},
        "tls": {},  # Generated: HTTPS with a certificate the operator makes
    }


def test_short_names_and_category(control_plane: ControlPlane, namespace: str) -> None:
    assert _apply(control_plane, _registry("short", namespace, {"region": "eu-west"}))[0] == 0
    for resource in ("reg", "berthreg", "berth"):
        out = control_plane.kubectl("get", resource, "-n", namespace, "-o", "name").stdout
        assert "registry.berth.dev/short" in out
    table = control_plane.kubectl("get", "registries", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "ENDPOINT", "PULL", "READY", "REPLICAS", "REGION", "AGE"]


NOT_CHECKED = (
    "* <nil>: Invalid value: null: some validation rules were not checked because the object "
    "was invalid; correct the existing errors to complete validation"
)


def _schema_error(kind: str, name: str, message: str) -> str:
    """How the API server words a schema error: CEL rules then stay unchecked."""
    return f'The {kind} "{name}" is invalid: \n* {message}\n{NOT_CHECKED}'


INVALID = [
    (
        {"replicas": 2},
        'The Registry "bad" is invalid: spec.replicas: Forbidden: replicas > 1 requires '
        "storage.s3 and metadata.postgresql (SQLite serves one pod only)",
    ),
    (
        {"replicas": 3, "storage": {"emptyDir": {}}},
        'The Registry "bad" is invalid: spec.replicas: Forbidden: replicas > 1 requires '
        "storage.s3 and metadata.postgresql (SQLite serves one pod only)",
    ),
    # A volume every pod can mount does not make one SQLite index shareable.
    (
        {"replicas": 3, "storage": {"pvc": {"accessModes": ["ReadWriteMany"]}}},
        'The Registry "bad" is invalid: spec.replicas: Forbidden: replicas > 1 requires '
        "storage.s3 and metadata.postgresql (SQLite serves one pod only)",
    ),
    (
        {"storage": {"s3": {"bucket": "images", "credentialsSecretRef": {"name": "keys"}}}},
        'The Registry "bad" is invalid: spec.metadata.postgresql: Required value: storage.s3 '
        "requires metadata.postgresql: no volume is left for the SQLite index",
    ),
    (
        {"storage": {"pvc": {}, "emptyDir": {}}},
        'The Registry "bad" is invalid: spec.storage: Invalid value: "object": exactly one of '
        "storage.pvc, storage.s3 or storage.emptyDir must be set",
    ),
    (
        {
            "storage": {"s3": {"bucket": "images"}},
            "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}},
        },
        'The Registry "bad" is invalid: spec.storage.s3: Invalid value: "object": storage.s3 '
        "requires credentialsSecretRef",
    ),
    (
        {"backup": {}, "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}}},
        'The Registry "bad" is invalid: spec.backup: Forbidden: backup copies a volume and its '
        "SQLite index: with storage.s3 or metadata.postgresql, back up the bucket and the "
        "database with their own tools",
    ),
    (
        {"imagePullPolicy": "Sometimes"},
        _schema_error(
            "Registry",
            "bad",
            'spec.imagePullPolicy: Unsupported value: "Sometimes": '
            'supported values: "Always", "IfNotPresent", "Never"',
        ),
    ),
    (
        {"storage": {"pvc": {"size": "lots"}}},
        # A pattern mismatch leaves the CEL rules checkable: a one-line message.
        'The Registry "bad" is invalid: spec.storage.pvc.size: Invalid value: "lots": '
        "spec.storage.pvc.size in body should match '^(\\+)?(([0-9]+(\\.[0-9]*)?)|"
        "(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$'",
    ),
    (
        {"ingress": {"className": "nginx"}},
        _schema_error("Registry", "bad", "spec.ingress.host: Required value"),
    ),
    (
        {"ingress": {"host": "r.example.com", "trustedProxies": ["ingress-nginx"]}},
        'The Registry "bad" is invalid: spec.ingress.trustedProxies[0]: Invalid value: '
        '"ingress-nginx": spec.ingress.trustedProxies[0] in body should match '
        "'^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$'",
    ),
    (
        {
            "upstreams": [
                {
                    "name": "hub",
                    "url": "https://registry-1.docker.io",
                    "prefix": "docker.io",
                    "username": "a:b",
                    "passwordSecretRef": {"name": "hub"},
                }
            ]
        },
        'The Registry "bad" is invalid: spec.upstreams[0].username: Invalid value: "a:b": '
        "spec.upstreams[0].username in body should match '^[^:]*$'",
    ),
    (
        {
            "upstreams": [
                {
                    "name": "hub",
                    "url": "https://registry-1.docker.io",
                    "prefix": "docker.io",
                    "username": "me",
                    "credentialsSecretRef": {"name": "hub"},
                }
            ]
        },
        'The Registry "bad" is invalid: spec.upstreams[0]: Invalid value: "object": '
        "credentialsSecretRef replaces username and passwordSecretRef",
    ),
    (
        {"nodeProxy": {"port": 80}},
        # Like a pattern, a minimum leaves the CEL rules checkable: a one-line message.
        'The Registry "bad" is invalid: spec.nodeProxy.port: Invalid value: 80: '
        "spec.nodeProxy.port in body should be greater than or equal to 1024",
    ),
    (
        {"nodeProxy": {"port": 30080}},
        'The Registry "bad" is invalid: spec.nodeProxy.port: Forbidden: nodeProxy.port must '
        "be outside the NodePort range 30000-32767 (kube-proxy serves NodePorts on 127.0.0.1 "
        "too)",
    ),
    (
        {"tls": {"mode": "Secret"}},
        'The Registry "bad" is invalid: spec.tls.secretRef: Invalid value: "object": '
        "secretRef is required with mode Secret, and read with it only",
    ),
    (
        {"tls": {"mode": "Disabled", "secretRef": {"name": "cert"}}},
        'The Registry "bad" is invalid: spec.tls.secretRef: Invalid value: "object": '
        "secretRef is required with mode Secret, and read with it only",
    ),
    (
        {"tls": {"mode": "Auto"}},
        _schema_error(
            "Registry",
            "bad",
            'spec.tls.mode: Unsupported value: "Auto": '
            'supported values: "Generated", "Secret", "Disabled"',
        ),
    ),
]


@pytest.mark.parametrize(("spec", "message"), INVALID)
def test_invalid_specs_are_refused(
    control_plane: ControlPlane, namespace: str, spec: dict[str, Any], message: str
) -> None:
    code, err = _apply(control_plane, _registry("bad", namespace, spec))
    assert code != 0
    assert err == message


def test_s3_and_postgresql_allow_replicas(control_plane: ControlPlane, namespace: str) -> None:
    spec = {
        "replicas": 3,
        "storage": {"s3": {"bucket": "images", "credentialsSecretRef": {"name": "keys"}}},
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}},
    }
    code, err = _apply(control_plane, _registry("scaled", namespace, spec), "--dry-run=server")
    assert code == 0, err


def test_the_extra_samples_are_valid(control_plane: ControlPlane, namespace: str) -> None:
    """samples/more/ (applied by hand): what the API server admits, in a namespace of ours."""
    sample = (REPO_ROOT / "samples" / "more" / "pull-through-cache.yaml").read_text()
    text = sample.replace("namespace: registries", f"namespace: {namespace}")
    done = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
    assert done.returncode == 0, done.stderr


def test_backup_defaults(control_plane: ControlPlane, namespace: str) -> None:
    code, err = _apply(control_plane, _registry("saved", namespace, {"backup": {}}))
    assert code == 0, err
    stored = control_plane.kubectl_json("get", "registry", "saved", "-n", namespace)
    assert stored["spec"]["backup"] == {"intervalHours": 24, "keep": 7, "pvc": {"size": "10Gi"}}


def test_name_must_fit_a_service(control_plane: ControlPlane, namespace: str) -> None:
    code, err = _apply(control_plane, _registry("9lives", namespace, {}))
    assert code != 0
    assert err == (
        'The Registry "9lives" is invalid: <nil>: Invalid value: "object": metadata.name must be '
        "a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, at most "
        "63 characters): it names the registry's Service"
    )


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (
            {"storageClassName": "fast"},
            {"storageClassName": "slow"},
            'spec.storage.pvc.storageClassName: Invalid value: "string": '
            "storage.pvc.storageClassName is immutable",
        ),
        (
            {"accessModes": ["ReadWriteOnce"]},
            {"accessModes": ["ReadWriteMany"]},
            'spec.storage.pvc.accessModes: Invalid value: "array": '
            "storage.pvc.accessModes are immutable",
        ),
        (
            {"size": "20Gi"},
            {"size": "10Gi"},
            'spec.storage.pvc.size: Invalid value: "string": storage.pvc.size cannot shrink',
        ),
    ],
)
def test_storage_transitions(
    control_plane: ControlPlane,
    namespace: str,
    before: dict[str, Any],
    after: dict[str, Any],
    message: str,
) -> None:
    code, err = _apply(control_plane, _registry("store", namespace, {"storage": {"pvc": before}}))
    assert code == 0, err
    code, err = _apply(control_plane, _registry("store", namespace, {"storage": {"pvc": after}}))
    assert code != 0
    assert err == f'The Registry "store" is invalid: {message}'


def test_growing_the_claim_is_allowed(control_plane: ControlPlane, namespace: str) -> None:
    for size in ("10Gi", "20Gi"):
        spec = {"storage": {"pvc": {"size": size}}}
        code, err = _apply(control_plane, _registry("grow", namespace, spec))
        assert code == 0, err


def _repository(namespace: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Repository",
            "metadata": {"name": "api", "namespace": namespace},
            "spec": spec,
        }
    )


def test_repository_schema(control_plane: ControlPlane, namespace: str) -> None:
    spec = {
        "registryRef": {"name": "main"},
        "path": "team-a/api",
        "pullAccess": {
            "namespaces": ["team-a"],
            "namespaceSelector": {"matchLabels": {"berth.dev/pull": "team-a"}},
        },
        "retention": {"keepLast": 20, "protect": ["v*"], "untaggedDays": 14},
        "immutableTags": ["v*"],
        "quota": {"storage": "10Gi", "tags": 1000},
    }
    code, err = _apply(control_plane, _repository(namespace, spec))
    assert code == 0, err
    stored = control_plane.kubectl_json("get", "repo", "api", "-n", namespace)["spec"]
    assert stored == {**spec, "visibility": "private"}

    code, err = _apply(control_plane, _repository(namespace, {**spec, "path": "team-b/api"}))
    assert code != 0
    assert err == (
        'The Repository "api" is invalid: spec.path: Invalid value: "string": path is immutable'
    )
    # Sizes the server's policy reads, and nothing else.
    for quota, field in (({"storage": "1.5Gi"}, "storage"), ({"tags": -1}, "tags")):
        code, err = _apply(control_plane, _repository(namespace, {**spec, "quota": quota}))
        assert code != 0 and f"spec.quota.{field}" in err, err
    # Names that reach API paths are names (a ServiceAccount given as a path, found by
    # review), and the days of untagged retention are whole and bounded.
    for change, field in (
        (
            {"pullAccess": {"serviceAccounts": ["../../../namespaces/kube-system/secrets/x"]}},
            "spec.pullAccess.serviceAccounts[0]",
        ),
        ({"pullAccess": {"secretName": "Team_Pull"}}, "spec.pullAccess.secretName"),
        ({"retention": {"untaggedDays": 0}}, "spec.retention.untaggedDays"),
        ({"retention": {"untaggedDays": 1.5}}, "spec.retention.untaggedDays"),
        ({"rotation": {"interval": "0s"}}, "rotation.interval must be at least 1h"),
        (
            {
                "pullAccess": {
                    "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In"}]}
                }
            },
            "In and NotIn need values",
        ),
        (
            {
                "pullAccess": {
                    "namespaceSelector": {
                        "matchExpressions": [{"key": "env", "operator": "Exists", "values": ["x"]}]
                    }
                }
            },
            "Exists and DoesNotExist take none",
        ),
        (
            {"rotation": {"interval": "2h", "overlap": "3h"}},
            "rotation.overlap must be shorter than rotation.interval",
        ),
    ):
        code, err = _apply(control_plane, _repository(namespace, {**spec, **change}))
        assert code != 0 and field in err, err


def test_repository_path_grammar(control_plane: ControlPlane, namespace: str) -> None:
    spec = {"registryRef": {"name": "main"}, "path": "Team/API"}
    code, err = _apply(control_plane, _repository(namespace, spec))
    assert code != 0
    assert err.startswith(
        'The Repository "api" is invalid: spec.path: Invalid value: "Team/API": '
        "spec.path in body should match"
    )
    # Patterns of names are paths too (the server's policy grammar); empty components not.
    for pattern in ("team-a/*", "team-a/**", "team-?/api-*"):
        code, err = _apply(control_plane, _repository(namespace, {**spec, "path": pattern}))
        assert code == 0, err
        control_plane.kubectl("delete", "repo", "api", "-n", namespace)
    code, err = _apply(control_plane, _repository(namespace, {**spec, "path": "team-a//*"}))
    assert code != 0 and "spec.path in body should match" in err
