"""A Registry with `replicas: 3`, `storage.s3` and `metadata.postgresql`, reconciled by
the operator on a real control plane, its rendered pod started three times
(tests/support/podspec_runner.py) behind a round-robin balancer: three processes, one
bucket (SeaweedFS), one database (PostgreSQL). Real clients push and pull through the
balancer; StorageReady follows what the servers say of their back ends, and rotating
the user's S3 keys rolls the pods.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.support import podspec_runner
from tests.support.balancer import Balancer
from tests.support.clients import skopeo
from tests.support.control_plane import ControlPlane
from tests.support.images import make_oci_layout, tagged_digest
from tests.support.operator_process import OperatorProcess, operator_running, registry_condition
from tests.support.operator_process import wait_for as _wait
from tests.support.s3_store import S3Store

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"
REPLICAS = 3


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, overrides: Path
) -> Iterator[OperatorProcess]:
    with operator_running(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        "--resync-seconds=60",
        "--replication-poll-seconds=1",  # also how often /readyz is asked
        f"--endpoint-overrides={overrides}",
    ) as running:
        yield running


def _secret(plane: ControlPlane, namespace: str, name: str, **data: str) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(document))


def _storage_ready(kube: kube_client.Client, namespace: str) -> Mapping[str, Any]:
    return registry_condition(kube, namespace, "main", "StorageReady")


def _inputs(
    kube: kube_client.Client, namespace: str, deployment: dict[str, Any]
) -> tuple[list[Any], list[Any]] | None:
    return podspec_runner.inputs(
        lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, deployment
    )


def _serving_pair(kube: kube_client.Client, namespace: str) -> dict[str, str]:
    secret = kube.get("v1", "Secret", namespace, names.serving_secret("main"))
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_three_replicas_on_s3_and_postgresql(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    overrides: Path,
    s3_store: S3Store,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    prefix = s3_store.new_prefix("operator")
    spec = {
        "replicas": REPLICAS,
        "storage": {
            "s3": {
                "bucket": s3_store.bucket,
                "endpoint": s3_store.endpoint,
                "region": s3_store.region,
                "prefix": prefix,
                "credentialsSecretRef": {"name": "s3-keys"},
            }
        },
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}},
    }
    document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": "main"}, "spec": spec}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))

    # The user's Secrets are not there yet: the status names them.
    missing = _wait(
        lambda: (c := _storage_ready(kube, namespace)).get("reason") == "SecretMissing" and c,
        operator,
        "StorageReady=False naming the missing Secrets",
    )
    assert "Secret s3-keys (spec.storage.s3.credentialsSecretRef)" in missing["message"]
    assert "Secret berth-db (spec.metadata.postgresql.connectionSecretRef)" in missing["message"]
    _secret(
        control_plane,
        namespace,
        "s3-keys",
        accessKeyID=s3_store.access_key,
        secretAccessKey=s3_store.secret_key,
    )
    _secret(control_plane, namespace, "berth-db", dsn=postgres_dsn)

    deployment = _wait(
        lambda: (
            (d := kube.find("apps/v1", "Deployment", namespace, "main"))
            and _inputs(kube, namespace, d)
            and d
        ),
        operator,
        "the Deployment and every Secret its pods mount",
    )
    assert deployment["spec"]["replicas"] == REPLICAS
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert kube.find("v1", "PersistentVolumeClaim", namespace, names.pvc("main")) is None
    assert kube.find("policy/v1", "PodDisruptionBudget", namespace, "main") is not None
    inputs = _inputs(kube, namespace, deployment)
    assert inputs is not None
    pods = [
        podspec_runner.start(deployment, *inputs, tmp_path / f"pod-{i}") for i in range(REPLICAS)
    ]
    # HTTPS through the balancer too: it presents the replicas' own certificate.
    tls_dir = tmp_path / "balancer-tls"
    tls_dir.mkdir()
    serving = _serving_pair(kube, namespace)
    (tls_dir / "tls.crt").write_text(serving["tls.crt"])
    (tls_dir / "tls.key").write_text(serving["tls.key"])
    balancer = Balancer(
        tmp_path / "balancer",
        [pod.host for pod in pods],
        tls=(tls_dir / "tls.crt", tls_dir / "tls.key"),
        context=pods[0].context,
    )
    certs = pods[0].cert_dir(tmp_path / "certs")
    try:
        balancer.start()  # in the try: pods started above must stop if it fails
        overrides.write_text(json.dumps({f"{namespace}/main": balancer.url}))
        _wait(
            lambda: _storage_ready(kube, namespace).get("reason") == "Connected",
            operator,
            "StorageReady=True from the servers' /readyz",
        )
        auth = kube.find("v1", "Secret", namespace, names.secret("main")) or {}
        data = {k: base64.b64decode(v).decode() for k, v in auth["data"].items()}
        creds = f"{data['admin-username']}:{data['admin-password']}"

        # Pushed through the balancer (each request of the flow to another process) and
        # pulled from every process alone: one store, one index.
        source = tmp_path / "source"
        digest = make_oci_layout(source, "v1", layers=3)
        skopeo(
            "copy", f"--dest-cert-dir={certs}", f"--dest-creds={creds}",
            f"oci:{source}:v1", f"docker://{balancer.host}/team/app:v1",
        )  # fmt: skip
        for i, pod in enumerate(pods):
            back = tmp_path / f"back-{i}"
            skopeo(
                "copy", f"--src-cert-dir={certs}", f"--src-creds={creds}",
                f"docker://{pod.host}/team/app:v1", f"oci:{back}:v1",
            )  # fmt: skip
            assert tagged_digest(back, "v1") == digest
        listed = skopeo(
            "list-tags", f"--cert-dir={certs}", f"--creds={creds}",
            f"docker://{balancer.host}/team/app",
        )  # fmt: skip
        assert json.loads(listed.stdout)["Tags"] == ["v1"]
        spread = balancer.requests_per_upstream()
        assert all(spread.get(pod.host, 0) > 0 for pod in pods), spread
        # The blobs are in the bucket under the prefix, none on the pods' own volumes.
        assert any(key.startswith("blobs/") for key in s3_store.keys(prefix))
        for pod in pods:
            assert not [p for p in pod.mounts[names.DATA_DIR].rglob("*") if p.is_file()]

        # Rotated keys roll the pods (the server reads them once): a new pod template.
        before = deployment["spec"]["template"]["metadata"]["annotations"]
        _secret(
            control_plane,
            namespace,
            "s3-keys",
            accessKeyID=s3_store.access_key,
            secretAccessKey="not-the-key",
        )
        rolled = _wait(
            lambda: (
                (d := kube.find("apps/v1", "Deployment", namespace, "main"))
                and d["spec"]["template"]["metadata"]["annotations"] != before
                and d
            ),
            operator,
            "the pod template to change with the Secret",
        )
        # The new pod (as the kubelet would start it) cannot reach the store: the status
        # says so, from its /readyz.
        new_inputs = _inputs(kube, namespace, rolled)
        assert new_inputs is not None
        refused = podspec_runner.start(
            rolled, *new_inputs, tmp_path / "pod-rolled", wait_ready=False
        )
        pods.append(refused)
        overrides.write_text(json.dumps({f"{namespace}/main": refused.url}))
        unavailable = _wait(
            lambda: (
                (c := _storage_ready(kube, namespace)).get("reason") == "BackendUnavailable" and c
            ),
            operator,
            "StorageReady=False from the new pod's /readyz",
        )
        assert unavailable["status"] == "False"
        assert "blob store unavailable" in unavailable["message"], unavailable
    except BaseException:
        for pod in pods:
            print(pod.log_tail())
        raise
    finally:
        balancer.stop()
        for pod in pods:
            pod.stop()
