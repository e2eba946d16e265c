"""A Registry whose volume fills up: the operator reports it (StorageReady=False,
reason StorageFull, the usage) with one Warning event, and says when it is over.

The operator runs against a real control plane; the rendered pod runs from its pod spec
(tests/support/podspec_runner.py) with its data volume on a real small filesystem (a
tmpfs this test mounts), which another writer then fills.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.support import podspec_runner
from tests.support.control_plane import ControlPlane
from tests.support.operator_process import OperatorProcess, operator_running, registry_condition
from tests.support.operator_process import wait_for as _wait
from tests.support.processes import http_status
from tests.support.volumes import fill, tmpfs

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, overrides: Path
) -> Iterator[OperatorProcess]:
    with operator_running(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        "--resync-seconds=60",
        "--replication-poll-seconds=1",  # also how often /readyz/writes is asked
        f"--endpoint-overrides={overrides}",
    ) as running:
        yield running


def _storage_ready(kube: kube_client.Client, namespace: str) -> Mapping[str, Any]:
    return registry_condition(kube, namespace, "main", "StorageReady")


def _storage_events(plane: ControlPlane, namespace: str) -> list[tuple[str, str]]:
    listed = plane.kubectl_json("get", "events", "-n", namespace)["items"]
    return [
        (e["type"], e["reason"])
        for e in listed
        if e["involvedObject"].get("kind") == "Registry" and e["reason"].startswith("Storage")
    ]


def test_a_full_volume_is_reported_and_its_end_too(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    overrides: Path,
    tmp_path: Path,
) -> None:
    document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": "main"}, "spec": {}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))
    deployment = _wait(
        lambda: (
            (d := kube.find("apps/v1", "Deployment", namespace, "main"))
            and podspec_runner.inputs(
                lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, d
            )
            and d
        ),
        operator,
        "the Deployment and what its pod mounts",
    )
    # No provisioner runs here: bind the claim as one would (the volume is the tmpfs).
    control_plane.kubectl(
        "patch", "pvc", names.pvc("main"), "-n", namespace, "--subresource=status",
        "--type=merge", "-p", '{"status": {"phase": "Bound"}}',
    )  # fmt: skip
    _wait(lambda: _storage_ready(kube, namespace).get("reason") == "Bound", operator, "Bound")
    inputs = podspec_runner.inputs(
        lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, deployment
    )
    assert inputs is not None
    root = tmp_path / "pod"
    # 160 MiB: above the server's default floor of 64 MiB free plus its 8 MiB reserve.
    with tmpfs(root / "volumes" / "data", 160) as volume:
        pod = podspec_runner.start(deployment, *inputs, root)
        try:
            overrides.write_text(json.dumps({f"{namespace}/main": pod.url}))
            fill(volume / "someone-elses-file")
            full = _wait(
                lambda: (c := _storage_ready(kube, namespace)).get("reason") == "StorageFull" and c,
                operator,
                "StorageReady=False, StorageFull",
            )
            assert full["status"] == "False"
            assert "free of 160.0 MiB" in full["message"] and "% used" in full["message"], full
            # Pulls still work: the registry stays in its Service.
            assert http_status(pod.url + "/readyz", context=pod.context) == 200
            warned = _wait(
                lambda: (
                    ("Warning", "StorageFull") in _storage_events(control_plane, namespace)
                    and _storage_events(control_plane, namespace)
                ),
                operator,
                "the StorageFull Warning event",
            )
            (volume / "someone-elses-file").unlink()
            _wait(
                lambda: _storage_ready(kube, namespace).get("reason") == "Bound",
                operator,
                "StorageReady back to True once space is freed",
            )
            events = _wait(
                lambda: (
                    ("Normal", "StorageRecovered")
                    in (e := _storage_events(control_plane, namespace))
                    and e
                ),
                operator,
                "the StorageRecovered event",
            )
            # One Warning for the whole episode, though the poll saw it full many times.
            assert events.count(("Warning", "StorageFull")) == 1, (warned, events)
        finally:
            pod.stop()


def _storage_class(plane: ControlPlane, name: str, expandable: bool) -> None:
    document = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "example.com/none",  # nothing provisions here: the test binds
        "allowVolumeExpansion": expandable,
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(document))


def _degraded(kube: kube_client.Client, namespace: str) -> dict[str, Any]:
    body = kube.find(API, "Registry", namespace, "main") or {}
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Degraded"), {})


@pytest.mark.parametrize("expandable", [True, False], ids=["expandable", "fixed-size"])
def test_raising_the_size_grows_the_claim_where_the_class_allows(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    expandable: bool,
) -> None:
    klass = f"{namespace[-6:]}-{'grows' if expandable else 'fixed'}"
    _storage_class(control_plane, klass, expandable)
    try:

        def apply(size: str) -> None:
            spec = {"storage": {"pvc": {"size": size, "storageClassName": klass}}}
            document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": "main"}}
            document["spec"] = spec
            control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))

        def requested() -> str | None:
            claim = kube.find("v1", "PersistentVolumeClaim", namespace, names.pvc("main"))
            return None if claim is None else claim["spec"]["resources"]["requests"]["storage"]

        apply("1Gi")
        _wait(lambda: requested() == "1Gi", operator, "the claim")
        # Bound, as a provisioner would leave it: only a bound claim can grow.
        control_plane.kubectl(
            "patch", "pvc", names.pvc("main"), "-n", namespace, "--subresource=status",
            "--type=merge", "-p",
            '{"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}',
        )  # fmt: skip
        apply("3Gi")
        if expandable:
            _wait(lambda: requested() == "3Gi", operator, "the claim's request to grow")
            assert _degraded(kube, namespace).get("status") == "False"
        else:
            refused = _wait(
                lambda: (d := _degraded(kube, namespace)).get("reason") == "ApplyRejected" and d,
                operator,
                "Degraded=True, ApplyRejected, with the API server's reason",
            )
            assert "PersistentVolumeClaim main-data" in refused["message"], refused
            assert requested() == "1Gi"
    finally:
        control_plane.kubectl("delete", "storageclass", klass, "--wait=false", check=False)
