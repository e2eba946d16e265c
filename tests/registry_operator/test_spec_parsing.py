"""Parsing a Registry body into the typed model, including the specs it must refuse."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import models


def _body(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    metadata = {"name": "main", "namespace": "registries", "uid": "u-1", "generation": 3, **meta}
    body: dict[str, Any] = {"apiVersion": "berth.dev/v1alpha1", "kind": "Registry"}
    body["metadata"] = metadata
    if spec is not None:
        body["spec"] = spec
    return body


def test_defaults() -> None:
    registry = models.parse_registry(_body(), image="img:1")
    assert registry.owner == models.Owner("main", "registries", "u-1")
    assert registry.generation == 3
    assert not registry.deleting
    spec = registry.spec
    assert spec.image == "img:1"
    assert spec.replicas == 1
    assert spec.storage == models.PvcStorage("10Gi", None, ("ReadWriteOnce",), False)
    assert spec.resources == models.DEFAULT_RESOURCES
    assert spec.ingress is None
    assert spec.log_level == "info"


def test_default_image_follows_the_package_version() -> None:
    image = models.parse_spec({}).image
    assert image.startswith(f"{models.DEFAULT_IMAGE_REPOSITORY}:")
    assert models.parse_spec({"image": "mine:2"}).image == "mine:2"


def test_every_field() -> None:
    spec = models.parse_spec(
        {
            "region": "eu-west",
            "replicas": 2,
            "image": "img:2",
            "imagePullPolicy": "Always",
            "imagePullSecrets": [{"name": "a"}],
            "resources": {"requests": {"cpu": 1, "memory": "1Gi"}},
            "logLevel": "error",
            "storage": {
                "pvc": {
                    "size": "1Ti",
                    "storageClassName": "nfs",
                    "accessModes": ["ReadWriteMany"],
                    "deleteOnRegistryDelete": True,
                }
            },
            "ingress": {
                "host": "r.example.com",
                "className": "nginx",
                "tls": {"secretName": "t"},
                "annotations": {"b": "2", "a": "1"},
            },
        }
    )
    assert spec.region == "eu-west"
    assert spec.image_pull_secrets == ("a",)
    assert spec.resources == {"requests": {"cpu": "1", "memory": "1Gi"}}
    assert spec.storage == models.PvcStorage("1Ti", "nfs", ("ReadWriteMany",), True)
    assert spec.ingress == models.Ingress(
        "r.example.com", "nginx", models.Tls("t"), {"a": "1", "b": "2"}
    )
    assert spec.ingress.url == "https://r.example.com"


def test_deleting() -> None:
    body = _body(deletionTimestamp="2026-01-01T00:00:00Z")
    assert models.parse_registry(body).deleting


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"replicas": -1}, "spec.replicas", "non-negative"),
        ({"replicas": "2"}, "spec.replicas", "non-negative"),
        ({"replicas": 2}, "spec.replicas", "shared storage"),
        ({"replicas": 2, "storage": {"emptyDir": {}}}, "spec.replicas", "shared storage"),
        ({"storage": {}}, "spec.storage", "exactly one"),
        ({"storage": {"pvc": {}, "emptyDir": {}}}, "spec.storage", "exactly one"),
        (
            {"storage": {"s3": {"bucket": "b", "credentialsSecretRef": {"name": "s"}}}},
            "spec.storage.s3",
            "not supported",
        ),
        ({"storage": {"pvc": {"size": "lots"}}}, "spec.storage.pvc.size", "quantity"),
        ({"storage": {"pvc": {"accessModes": []}}}, "spec.storage.pvc.accessModes", "empty"),
        (
            {"storage": {"pvc": {"accessModes": ["RWO"]}}},
            "spec.storage.pvc.accessModes[]",
            "one of",
        ),
        (
            {"storage": {"pvc": {"deleteOnRegistryDelete": "yes"}}},
            "spec.storage.pvc.deleteOnRegistryDelete",
            "boolean",
        ),
        ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", "one of"),
        ({"logLevel": "loud"}, "spec.logLevel", "one of"),
        (
            {"resources": {"limits": {"memory": "a lot"}}},
            "spec.resources.limits.memory",
            "quantity",
        ),
        ({"ingress": {}}, "spec.ingress.host", "non-empty"),
        ({"ingress": {"host": "Not A Host"}}, "spec.ingress.host", "DNS name"),
        ({"ingress": {"host": "a.b", "tls": {}}}, "spec.ingress.tls.secretName", "non-empty"),
        ({"imagePullSecrets": [{}]}, "spec.imagePullSecrets[].name", "non-empty"),
        ({"storage": "pvc"}, "spec.storage", "object"),
    ],
)
def test_invalid(spec: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_spec(spec, image="img")
    assert caught.value.field == field
    assert message in caught.value.message
    assert str(caught.value).startswith(f"{field}: ")


def test_invalid_metadata() -> None:
    with pytest.raises(models.InvalidSpec, match=r"metadata\.namespace"):
        models.parse_registry({"metadata": {"name": "x"}})
