"""A Registry with `spec.upstreams`: the operator renders the pull-through cache, the
upstream's password from the user's Secret mounted into the pod, and the rendered pod
(tests/support/podspec_runner.py) mirrors a real upstream (a Berth with token auth)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.integration.test_auth_clients import SECRETS, creds, start_auth_registry
from tests.support import podspec_runner
from tests.support.clients import skopeo
from tests.support.control_plane import ControlPlane
from tests.support.images import make_oci_layout, tagged_digest
from tests.support.operator_process import OperatorProcess
from tests.support.operator_process import wait_for as _wait
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    running = OperatorProcess(
        control_plane, tmp_path_factory.mktemp("operator"), ("--standalone", "--resync-seconds=60")
    ).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("form", ["passwordSecretRef", "credentialsSecretRef"])
def test_rendered_pod_pulls_through_an_upstream_with_the_secrets_password(
    form: str,
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
) -> None:
    upstream = start_auth_registry(registry_process, tmp_path)
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, "v1", layers=2, layer_size=40_000)
    skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", creds("ci"),
        f"oci:{layout}:v1", f"docker://{upstream.host}/team-a/api:v1",
    )  # fmt: skip
    # The token alone (the username in the spec), or the account and its token together.
    if form == "passwordSecretRef":
        data = {"token": SECRETS["ci"]}
        credentials: dict[str, Any] = {
            "username": "ci",
            "passwordSecretRef": {"name": "upstream-token", "key": "token"},
        }
    else:
        data = {"username": "ci", "password": SECRETS["ci"]}
        credentials = {"credentialsSecretRef": {"name": "upstream-token"}}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "upstream-token", "namespace": namespace},
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(secret))
    spec = {
        "upstreams": [
            {"name": "corp", "url": upstream.process.url, "prefix": "mirror", **credentials}
        ]
    }
    document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": "main"}, "spec": spec}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))

    def ready() -> tuple[dict[str, Any], tuple[list[Any], list[Any]]] | None:
        deployment = kube.find("apps/v1", "Deployment", namespace, "main")
        if deployment is None:
            return None
        found = podspec_runner.inputs(
            lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, deployment
        )
        return None if found is None else (deployment, found)

    deployment, (config_maps, secrets) = _wait(ready, operator, "the Deployment and its inputs")
    pod = podspec_runner.start(deployment, config_maps, secrets, tmp_path / "pod")
    try:
        auth = kube.find("v1", "Secret", namespace, names.secret("main")) or {}
        data = {k: base64.b64decode(v).decode() for k, v in auth["data"].items()}
        admin = f"{data['admin-username']}:{data['admin-password']}"
        back = tmp_path / "back"
        skopeo(
            "copy", "--src-tls-verify=false", "--src-creds", admin,
            f"docker://{pod.host}/mirror/team-a/api:v1", f"oci:{back}:v1",
        )  # fmt: skip
        assert tagged_digest(back, "v1") == digest
        # Fetched once, now stored here: served with the upstream gone.
        upstream.process.kill()
        again = tmp_path / "again"
        skopeo(
            "copy", "--src-tls-verify=false", "--src-creds", admin,
            f"docker://{pod.host}/mirror/team-a/api:v1", f"oci:{again}:v1",
        )  # fmt: skip
        assert tagged_digest(again, "v1") == digest
    except BaseException:
        print(pod.log_tail())
        raise
    finally:
        pod.stop()
