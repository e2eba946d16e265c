"""Parsing a Registry body into the typed model, including the specs it must refuse."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import models
from registry_operator.kube import resources


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
    assert spec.node_proxy == models.NodeProxy(enabled=True, port=None)
    assert registry.hosting is None


def test_default_image_follows_the_package_version() -> None:
    image = models.parse_spec({}).image
    assert image.startswith(f"{models.DEFAULT_IMAGE_REPOSITORY}:")
    assert models.parse_spec({"image": "mine:2"}).image == "mine:2"


def test_every_field() -> None:
    spec = models.parse_spec(
        {
            "region": "eu-west",
            "replicas": 1,
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


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, models.NodeProxy(True, None)),
        ({"enabled": False}, models.NodeProxy(False, None)),
        ({"port": 5123}, models.NodeProxy(True, 5123)),
        ({"enabled": True, "port": 1024}, models.NodeProxy(True, 1024)),
        ({"port": 65535}, models.NodeProxy(True, 65535)),
    ],
)
def test_node_proxy(raw: dict[str, Any], expected: models.NodeProxy) -> None:
    assert models.parse_spec({"nodeProxy": raw}, image="img").node_proxy == expected


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ("on", "spec.nodeProxy", "object"),
        ({"enabled": "yes"}, "spec.nodeProxy.enabled", "boolean"),
        ({"port": 80}, "spec.nodeProxy.port", "1024 to 65535"),
        ({"port": 65536}, "spec.nodeProxy.port", "1024 to 65535"),
        ({"port": "5123"}, "spec.nodeProxy.port", "1024 to 65535"),
        ({"port": True}, "spec.nodeProxy.port", "1024 to 65535"),
        ({"port": 5123.5}, "spec.nodeProxy.port", "1024 to 65535"),
    ],
)
def test_invalid_node_proxy(raw: Any, field: str, message: str) -> None:
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_spec({"nodeProxy": raw}, image="img")
    assert caught.value.field == field
    assert message in caught.value.message


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_local_registry_hosting_annotation(value: str, expected: bool) -> None:
    annotations = {models.LOCAL_REGISTRY_HOSTING_ANNOTATION: value}
    body = _body(annotations=annotations, creationTimestamp="2026-01-01T00:00:00Z")
    registry = models.parse_registry(body, image="img")
    assert registry.hosting is expected
    assert registry.created == "2026-01-01T00:00:00Z"


def test_invalid_local_registry_hosting_annotation() -> None:
    body = _body(annotations={models.LOCAL_REGISTRY_HOSTING_ANNOTATION: "yes"})
    with pytest.raises(models.InvalidSpec, match=r'must be "true" or "false"') as caught:
        models.parse_registry(body, image="img")
    assert caught.value.field == "metadata.annotations[berth.dev/local-registry-hosting]"


S3 = {"bucket": "images", "credentialsSecretRef": {"name": "s3-keys"}}
HUB = {"name": "hub", "url": "https://registry-1.docker.io", "prefix": "docker.io"}
PG = {"metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}}}


def test_scale_out_back_ends() -> None:
    spec = models.parse_spec(
        {
            "replicas": 3,
            "storage": {
                "s3": {
                    **S3,
                    "endpoint": "http://seaweedfs.storage.svc:8333/",
                    "prefix": "/eu/main/",
                    "caConfigMapRef": {"name": "ca"},
                }
            },
            "metadata": {"postgresql": {"connectionSecretRef": {"name": "db", "key": "uri"}}},
        }
    )
    assert spec.replicas == 3
    assert spec.storage == models.S3Storage(
        bucket="images",
        credentials_secret="s3-keys",
        endpoint="http://seaweedfs.storage.svc:8333",
        prefix="eu/main",
        ca=models.KeyRef("ca", "ca.crt"),
    )
    assert spec.postgresql == models.PostgresMetadata(models.KeyRef("db", "uri"), 10)
    # The index in PostgreSQL with blobs on a volume: valid, one replica.
    assert models.parse_spec(PG).postgresql == models.PostgresMetadata(models.KeyRef("db", "dsn"))


def test_deleting() -> None:
    body = _body(deletionTimestamp="2026-01-01T00:00:00Z")
    assert models.parse_registry(body).deleting


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"replicas": -1}, "spec.replicas", "non-negative"),
        ({"replicas": "2"}, "spec.replicas", "non-negative"),
        ({"replicas": 2}, "spec.replicas", "storage.s3 and metadata.postgresql"),
        ({"replicas": 2, "storage": {"emptyDir": {}}}, "spec.replicas", "SQLite serves one"),
        # A shared volume does not make SQLite's WAL shareable between hosts.
        (
            {"replicas": 2, "storage": {"pvc": {"accessModes": ["ReadWriteMany"]}}},
            "spec.replicas",
            "storage.s3 and metadata.postgresql",
        ),
        ({"replicas": 2, **PG}, "spec.replicas", "storage.s3 and metadata.postgresql"),
        ({"replicas": 2, "storage": {"s3": S3}}, "spec.metadata.postgresql", "storage.s3"),
        ({"storage": {}}, "spec.storage", "exactly one"),
        ({"storage": {"pvc": {}, "emptyDir": {}}}, "spec.storage", "exactly one"),
        ({"storage": {"s3": S3}}, "spec.metadata.postgresql", "no volume for the SQLite"),
        ({"storage": {"s3": {**S3, "bucket": "b"}}, **PG}, "spec.storage.s3.bucket", "bucket"),
        ({"storage": {"s3": {**S3, "bucket": "Big_Bucket"}}, **PG}, "spec.storage.s3.bucket", "S3"),
        ({"storage": {"s3": {"bucket": "bkt"}}, **PG}, "spec.storage.s3.credentialsSecretRef",
         "object"),
        ({"storage": {"s3": {**S3, "endpoint": "s3.local"}}, **PG}, "spec.storage.s3.endpoint",
         "http://"),
        ({"storage": {"s3": {**S3, "prefix": "a/../b"}}, **PG}, "spec.storage.s3.prefix",
         "key prefix"),
        ({"storage": {"s3": {**S3, "redirect": "yes"}}, **PG}, "spec.storage.s3.redirect",
         "boolean"),
        ({"storage": {"s3": {**S3, "caConfigMapRef": {"name": "ca", "key": "a b"}}}, **PG},
         "spec.storage.s3.caConfigMapRef.key", "valid key"),
        ({"metadata": {"postgresql": {}}}, "spec.metadata.postgresql.connectionSecretRef",
         "object"),
        ({"backup": {}, **PG}, "spec.backup", "SQLite index"),
        ({"upstreams": [{**HUB, "prefix": "../etc"}]}, "spec.upstreams[0].prefix", "path prefix"),
        ({"upstreams": [{**HUB, "url": "registry-1.docker.io"}]}, "spec.upstreams[0].url",
         "http://"),
        ({"upstreams": [{**HUB, "passwordSecretRef": {"name": "t"}}]},
         "spec.upstreams[0].username", "required"),
        ({"upstreams": [{**HUB, "username": "a:b"}]}, "spec.upstreams[0].username", "':'"),
        ({"upstreams": [{**HUB, "username": "me", "credentialsSecretRef": {"name": "c"}}]},
         "spec.upstreams[0].credentialsSecretRef", "replaces"),
        ({"upstreams": [{**HUB, "credentialsSecretRef": {}}]},
         "spec.upstreams[0].credentialsSecretRef.name", ""),
        ({"upstreams": [{**HUB, "keepLast": -1}]}, "spec.upstreams[0].keepLast", "0 to"),
        ({"upstreams": [{**HUB, "name": "x" * 51}]}, "spec.upstreams[0].name", "at most 50"),
        ({"upstreams": [HUB, {**HUB, "name": "other"}]}, "spec.upstreams", "prefix must be"),
        ({"backup": {"keep": 0}}, "spec.backup.keep", "1 to 100"),
        ({"backup": {"intervalHours": 1000}}, "spec.backup.intervalHours", "1 to 720"),
        ({"backup": {"pvc": {"size": "big"}}}, "spec.backup.pvc.size", "quantity"),
        ({"metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}, "poolSize": 0}}},
         "spec.metadata.postgresql.poolSize", "1 to 100"),
        ({"metadata": {"postgresql": {"connectionSecretRef": {"name": "Not/A/Name"}}}},
         "spec.metadata.postgresql.connectionSecretRef.name", "object name"),
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
        ({"ui": {"enabled": "no"}}, "spec.ui.enabled", "true or false"),
        ({"ui": "off"}, "spec.ui", "object"),
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
        (
            {"notifications": {"endpoints": [{"name": "Audit", "url": "http://x"}]}},
            "spec.notifications.endpoints[0].name",
            "DNS label",
        ),
        (
            {"notifications": {"endpoints": [{"name": "a", "url": "x"}]}},
            "spec.notifications.endpoints[0].url",
            "http",
        ),
        (
            {
                "notifications": {
                    "endpoints": [{"name": "a", "url": "http://x", "ignoreActions": ["pull"]}]
                }
            },
            "spec.notifications.endpoints[0].ignoreActions[]",
            "one of",
        ),
        (
            {
                "notifications": {
                    "endpoints": [
                        {"name": "a", "url": "http://x"},
                        {"name": "a", "url": "http://y"},
                    ]
                }
            },
            "spec.notifications.endpoints",
            "unique",
        ),
    ],
)  # fmt: skip
def test_invalid(spec: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_spec(spec, image="img")
    assert caught.value.field == field
    assert message in caught.value.message
    assert str(caught.value).startswith(f"{field}: ")


def test_invalid_metadata() -> None:
    with pytest.raises(models.InvalidSpec, match=r"metadata\.namespace"):
        models.parse_registry({"metadata": {"name": "x"}})


# --- replication peers ----------------------------------------------------------------------


def test_peers_by_registry_ref_and_by_url() -> None:
    spec = models.parse_registry(
        _body(
            {
                "region": "eu",
                "replication": {
                    "peers": [
                        {"name": "us", "registryRef": {"name": "main", "namespace": "us"}},
                        {"name": "eu2", "registryRef": {"name": "second"}},
                        {
                            "name": "mirror",
                            "kind": "oci",
                            "url": "https://mirror.example.com/",
                            "credentialsSecretRef": {"name": "mirror-creds"},
                        },
                    ]
                },
            }
        )
    ).spec
    assert spec.peers == (
        models.Peer("us", registry=models.RegistryRef("main", "us")),
        models.Peer("eu2", registry=models.RegistryRef("second", "registries")),
        models.Peer(
            "mirror", "oci", url="https://mirror.example.com", credentials_secret="mirror-creds"
        ),
    )


@pytest.mark.parametrize(
    ("replication", "field", "message"),
    [
        (
            {"peers": [{"name": "us", "registryRef": {"name": "x"}}]},
            "spec.region",
            "is required when spec.replication.peers are set",
        ),
        (
            {"peers": [{"name": "us"}]},
            "spec.replication.peers[0]",
            "a peer needs exactly one of url or registryRef",
        ),
        (
            {"peers": [{"name": "us", "kind": "oci", "registryRef": {"name": "x"}}]},
            "spec.replication.peers[0].kind",
            "a peer given by registryRef is a Berth peer",
        ),
        (
            {"peers": [{"name": "us", "url": "ftp://x", "credentialsSecretRef": {"name": "s"}}]},
            "spec.replication.peers[0].url",
            "must start with http:// or https://",
        ),
        (
            {"peers": [{"name": "a", "url": "https://x"}]},
            "spec.replication.peers[0].credentialsSecretRef",
            "must be an object",
        ),
        (
            {
                "peers": [
                    {"name": "a", "registryRef": {"name": "x"}},
                    {"name": "a", "registryRef": {"name": "y"}},
                ]
            },
            "spec.replication.peers",
            "peer names must be unique",
        ),
    ],
)
def test_invalid_peers(replication: dict[str, Any], field: str, message: str) -> None:
    spec: dict[str, Any] = {"replication": replication}
    if field != "spec.region":
        spec["region"] = "eu"
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_registry(_body(spec))
    assert (caught.value.field, caught.value.message) == (field, message)


# --- Repository -----------------------------------------------------------------------------


def _repository(spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "api",
            "namespace": "registries",
            "uid": "u-2",
            "generation": 2,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            **meta,
        },
        "spec": {"registryRef": {"name": "main"}, "path": "team-a/api", **spec},
    }


def test_repository_with_every_field() -> None:
    repository = models.parse_repository(
        _repository(
            {
                "visibility": "public",
                "pullAccess": {
                    "namespaces": ["b", "a", "a"],
                    "namespaceSelector": {
                        "matchLabels": {"team": "a"},
                        "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["x"]}],
                    },
                    "serviceAccounts": ["default"],
                    "secretName": "pull",
                },
                "pushAccess": {},
                "retention": {"keepLast": 20, "protect": ["v*"], "untaggedDays": 30},
                "immutableTags": ["v*"],
                "rotation": {"interval": "720h", "overlap": "1m30s"},
                "quota": {"storage": "10Gi", "tags": 500},
            },
            annotations={"berth.dev/rotate": "now"},
        )
    )
    assert repository.owner == models.Owner("api", "registries", "u-2", kind="Repository")
    assert repository.registry == "main"
    assert repository.visibility == "public"
    assert repository.pull is not None
    assert repository.pull.namespaces == ("a", "b")
    assert repository.pull.covers("a", {})
    assert repository.pull.covers("c", {"team": "a"})
    assert not repository.pull.covers("c", {"team": "a", "env": "x"})
    assert repository.push == models.Access()
    assert repository.retention == models.Retention(20, ("v*",), 30)
    assert repository.rotation == models.Rotation(interval=720 * 3600, overlap=90)
    assert repository.rotate_request == "now"
    assert repository.quota == models.Quota(10 * 2**30, 500)


@pytest.mark.parametrize(
    ("quota", "expected"),
    [
        ({"storage": "500Mi"}, models.Quota(500 * 2**20, None)),
        ({"storage": "2G"}, models.Quota(2 * 10**9, None)),
        ({"storage": 1000}, models.Quota(1000, None)),
        ({"tags": 0}, models.Quota(None, 0)),
        ({}, None),
        (None, None),
    ],
)
def test_repository_quotas(quota: Any, expected: models.Quota | None) -> None:
    assert models.parse_repository(_repository({"quota": quota})).quota == expected


@pytest.mark.parametrize(
    ("operator", "values", "labels", "matches"),
    [
        ("In", ["a", "b"], {"k": "b"}, True),
        ("In", ["a"], {}, False),
        ("NotIn", ["a"], {}, True),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("Exists", [], {"k": ""}, True),
        ("DoesNotExist", [], {"k": ""}, False),
    ],
)
def test_selector_operators(
    operator: str, values: list[str], labels: dict[str, str], matches: bool
) -> None:
    requirement = models.Requirement("k", operator, tuple(values))
    assert requirement.matches(labels) is matches


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"path": "Team/API"}, "spec.path"),
        ({"visibility": "internal"}, "spec.visibility"),
        ({"pullAccess": {"namespaces": ["Not_A_Namespace"]}}, "spec.pullAccess.namespaces"),
        ({"rotation": {"interval": "30d"}}, "spec.rotation.interval"),
        ({"retention": {"keepLast": 0}}, "spec.retention.keepLast"),
        ({"retention": {"untaggedDays": 0}}, "spec.retention.untaggedDays"),
        # Names that would leave their URL path segment (found by review).
        (
            {"pullAccess": {"serviceAccounts": ["../../../namespaces/kube-system/secrets/x"]}},
            "spec.pullAccess.serviceAccounts",
        ),
        ({"pushAccess": {"serviceAccounts": ["Default"]}}, "spec.pushAccess.serviceAccounts"),
        ({"registryRef": {"name": "../main"}}, "spec.registryRef.name"),
        ({"retention": {"untaggedDays": 1.5}}, "spec.retention.untaggedDays"),
        ({"retention": {"untaggedDays": 36501}}, "spec.retention.untaggedDays"),
        # Patterns the registry server would refuse (and with them the whole policy file).
        ({"immutableTags": ["release/*"]}, "spec.immutableTags[]"),
        ({"retention": {"keepLast": 1, "protect": ["v[0-9]*"]}}, "spec.retention.protect[]"),
        # Sizes the server's policy would refuse: no decimals, no milli, no "GB".
        ({"quota": {"storage": "1.5Gi"}}, "spec.quota.storage"),
        ({"quota": {"storage": "500m"}}, "spec.quota.storage"),
        ({"quota": {"storage": "10GB"}}, "spec.quota.storage"),
        ({"quota": {"storage": True}}, "spec.quota.storage"),
        ({"quota": {"tags": -1}}, "spec.quota.tags"),
        ({"quota": "10Gi"}, "spec.quota"),
        (
            {
                "pullAccess": {
                    "namespaceSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}
                }
            },
            "spec.pullAccess.namespaceSelector.matchExpressions[0].values",
        ),
    ],
)
def test_invalid_repositories(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_repository(_repository(spec))
    assert caught.value.field == field


def test_an_object_name_stays_one_path_segment() -> None:
    secrets = resources.lookup("v1", "Secret")
    assert secrets.path("team-a", "pull.x") == "/api/v1/namespaces/team-a/secrets/pull.x"
    for name in ("..", ".", "", "../kube-system/secrets/x", "a?watch=1", "a%2Fb"):
        with pytest.raises(ValueError, match="cannot name"):
            secrets.path("team-a", name)
    with pytest.raises(ValueError, match="cannot name"):
        secrets.path("..", "x")


def test_a_rotation_interval_stored_below_an_hour_is_read_as_an_hour() -> None:
    """The CRD refuses it now; a Repository stored before keeps its grants."""
    for interval in ("0s", "59m"):
        repository = models.parse_repository(_repository({"rotation": {"interval": interval}}))
        assert repository.rotation.interval == models.MIN_ROTATION_INTERVAL


def test_durations() -> None:
    assert models.parse_duration("1h30m", "f") == 5400
    assert models.parse_duration("0.5s", "f") == 0.5
    with pytest.raises(models.InvalidSpec):
        models.parse_duration("", "f")


def test_webhooks() -> None:
    spec = models.parse_spec(
        {
            "notifications": {
                "endpoints": [
                    {"name": "audit", "url": "https://h", "headersSecretRef": {"name": "s"}},
                    {"name": "ci", "url": "http://c", "ignoreActions": ["delete"]},
                ]
            }
        }
    )
    assert spec.webhooks == (
        models.Webhook("audit", "https://h", "s"),
        models.Webhook("ci", "http://c", None, ("delete",)),
    )


def test_backup() -> None:
    spec = models.parse_spec({"backup": {"keep": 3, "pvc": {"storageClassName": "slow"}}})
    assert spec.backup == models.Backup(24, 3, models.PvcStorage(storage_class_name="slow"))
    assert models.parse_spec({}).backup is None


def test_upstreams() -> None:
    spec = models.parse_spec(
        {"upstreams": [{**HUB, "prefix": "/Docker.io/", "username": "me",
                        "passwordSecretRef": {"name": "hub-token"}}]}
    )  # fmt: skip
    assert spec.upstreams == (
        models.Upstream(
            "hub",
            "https://registry-1.docker.io",
            "docker.io",
            username="me",
            password=models.KeyRef("hub-token", "password"),
        ),
    )
    spec = models.parse_spec({"upstreams": [{**HUB, "credentialsSecretRef": {"name": "hub"}}]})
    assert spec.upstreams[0].credentials_secret == "hub"
    assert (spec.upstreams[0].username, spec.upstreams[0].password) == ("", None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, models.ServingTls("Generated")),  # HTTPS by default
        ({}, models.ServingTls("Generated")),
        ({"mode": "Disabled"}, models.ServingTls("Disabled")),
        ({"secretRef": {"name": "registry-cert"}}, models.ServingTls("Secret", "registry-cert")),
        ({"mode": "Secret", "secretRef": {"name": "c"}}, models.ServingTls("Secret", "c")),
    ],
)
def test_tls(raw: Any, expected: models.ServingTls) -> None:
    spec = models.parse_spec({} if raw is None else {"tls": raw}, image="img")
    assert spec.tls == expected
    assert spec.scheme == ("http" if expected.mode == "Disabled" else "https")


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ("on", "spec.tls", "object"),
        ({"mode": "Auto"}, "spec.tls.mode", "one of Generated, Secret, Disabled"),
        ({"mode": "Secret"}, "spec.tls.secretRef", "required with mode Secret"),
        (
            {"mode": "Disabled", "secretRef": {"name": "c"}},
            "spec.tls.secretRef",
            "mode Secret only",
        ),
        ({"secretRef": {}}, "spec.tls.secretRef.name", "non-empty"),
        ({"secretRef": {"name": "../c"}}, "spec.tls.secretRef.name", "Secret's name"),
    ],
)
def test_invalid_tls(raw: Any, field: str, message: str) -> None:
    with pytest.raises(models.InvalidSpec, match=message) as caught:
        models.parse_spec({"tls": raw}, image="img")
    assert caught.value.field == field
