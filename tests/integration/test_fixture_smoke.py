"""Smoke tests for the test ground itself: the control plane and registry fixtures."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.control_plane import ControlPlane
from tests.support.images import (
    MEDIA_TYPE_INDEX,
    make_oci_index_layout,
    make_oci_layout,
    read_json_blob,
    tagged_digest,
)
from tests.support.processes import RegistryProcess
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration


def test_configmap_round_trip(control_plane: ControlPlane, namespace: str) -> None:
    from kubernetes import client

    with control_plane.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.create_namespaced_config_map(
            namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="smoke"), data={"greeting": "hello"}
            ),
        )
        read = core.read_namespaced_config_map("smoke", namespace)
    assert read.data == {"greeting": "hello"}
    # kubectl sees the same object through the admin kubeconfig.
    assert control_plane.kubectl_json("get", "configmap", "smoke", "-n", namespace)["data"] == {
        "greeting": "hello"
    }


def _wait_gone(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def test_owner_reference_garbage_collection(control_plane: ControlPlane, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with control_plane.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        owner = core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
        )
        assert owner.metadata is not None and owner.metadata.uid
        owner_ref = client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
        )
        core.create_namespaced_config_map(
            namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="child", owner_references=[owner_ref])
            ),
        )
        core.delete_namespaced_config_map(
            "owner", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
        )

        def child_gone() -> bool:
            try:
                core.read_namespaced_config_map("child", namespace)
            except ApiException as err:
                if err.status == 404:
                    return True
                raise
            return False

        assert _wait_gone(child_gone, timeout=60), "the garbage collector kept the child"


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require_tool("skopeo")), "--insecure-policy", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def _raw_manifest(ref: str) -> bytes:
    raw = subprocess.run(
        [str(require_tool("skopeo")), "inspect", "--raw", "--tls-verify=false", ref],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return raw


@pytest.mark.parametrize("multi_arch", [False, True], ids=["image", "index"])
def test_skopeo_round_trip_through_distribution(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, multi_arch: bool
) -> None:
    require_tool("skopeo")
    registry = registry_process("distribution")
    source = tmp_path / "source"
    if multi_arch:
        digest = make_oci_index_layout(source, "v1", layers=2, layer_size=4096)
    else:
        digest = make_oci_layout(source, "v1", layers=2, layer_size=4096)
    remote = f"docker://{registry.host}/smoke/img:v1"

    copy_all = ["--all"] if multi_arch else []
    _skopeo("copy", *copy_all, "--dest-tls-verify=false", f"oci:{source}:v1", remote)
    raw = _raw_manifest(remote)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest

    back = tmp_path / "back"
    _skopeo("copy", *copy_all, "--src-tls-verify=false", remote, f"oci:{back}:v1")
    assert tagged_digest(back, "v1") == digest
    manifest: dict[str, Any] = read_json_blob(back, digest)
    if multi_arch:
        assert manifest["mediaType"] == MEDIA_TYPE_INDEX
        assert len(manifest["manifests"]) == 2
    else:
        assert len(manifest["layers"]) == 2
    # Survives a restart of the registry: it really stored the content.
    registry.restart()
    assert json.loads(_raw_manifest(remote)) == json.loads(raw)
