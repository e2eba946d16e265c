"""Golden tests: a Registry spec in, the exact manifests out.

Regenerate after an intended change with `BERTH_UPDATE_GOLDEN=1 pytest tests/registry_operator`
and review the diff of tests/registry_operator/golden/ like any other code change.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry_operator import credentials, models, node_access, reconcile, rendering
from registry_operator.kube import resources
from registry_operator.rendering import manifests, names
from registry_server import config as server_config

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("BERTH_UPDATE_GOLDEN") == "1"
IMAGE = "ghcr.io/berth-dev/berth:golden"
OWNER = models.Owner(
    name="main", namespace="registries", uid="00000000-0000-0000-0000-00000000c0de"
)
# Fixed stand-ins for the generated secrets: rendering never generates anything itself.
CREDENTIALS = credentials.Credentials(
    signing_key_pem="-----BEGIN PRIVATE KEY-----\ngolden-not-a-key\n-----END PRIVATE KEY-----\n",
    admin=credentials.User("admin", "admin-password-golden", "$2b$12$goldenadminhash"),
    replication=credentials.User("replicator", "replication-password-golden", "$2b$12$goldenrepl"),
)

# Stand-ins for the CA and certificate of spec.tls Generated (serving_tls.plan makes them).
SERVING = manifests.ServingSecrets(
    ca_cert="-----BEGIN CERTIFICATE-----\ngolden-ca\n-----END CERTIFICATE-----\n",
    ca_key="-----BEGIN PRIVATE KEY-----\ngolden-ca-key\n-----END PRIVATE KEY-----\n",
    cert="-----BEGIN CERTIFICATE-----\ngolden-serving\n-----END CERTIFICATE-----\n",
    key="-----BEGIN PRIVATE KEY-----\ngolden-serving-key\n-----END PRIVATE KEY-----\n",
)

CASES: dict[str, dict[str, Any]] = {
    # Everything defaulted: a 10Gi RWO claim kept after deletion, one replica, HTTPS
    # with a generated certificate.
    "defaults": {},
    # Plain HTTP (an Ingress terminating TLS in front): no certificates, http probes.
    "tls-disabled": {"tls": {"mode": "Disabled"}, "ingress": {"host": "registry.example.com"}},
    # A user's Secret (cert-manager's): mounted, nothing generated; the Ingress is told
    # the backend speaks HTTPS.
    "tls-secret": {
        "tls": {"secretRef": {"name": "registry-cert"}},
        "ingress": {"host": "registry.example.com", "className": "nginx"},
    },
    # Every optional field of the server and its claim (one replica: SQLite on the volume).
    "pvc-full": {
        "region": "eu-west",
        "replicas": 1,
        "image": "registry.example.com/berth:1.2.3",
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "pull-a"}, {"name": "pull-b"}],
        "resources": {"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "logLevel": "debug",
        "storage": {
            "pvc": {
                "size": "50Gi",
                "storageClassName": "fast-rwx",
                "accessModes": ["ReadWriteMany"],
                "deleteOnRegistryDelete": True,
            }
        },
    },
    "emptydir": {"storage": {"emptyDir": {"sizeLimit": "2Gi"}}},
    # Scale-out: three replicas over an object store and PostgreSQL, every S3 field.
    "s3-postgresql": {
        "replicas": 3,
        "storage": {
            "s3": {
                "bucket": "berth-images",
                "endpoint": "https://s3.storage.svc:8333/",
                "region": "eu-west-1",
                "prefix": "/registries/main/",
                "pathStyle": False,
                "redirect": True,
                "credentialsSecretRef": {"name": "s3-keys"},
                "caConfigMapRef": {"name": "store-ca", "key": "bundle.pem"},
            }
        },
        "metadata": {
            "postgresql": {"connectionSecretRef": {"name": "berth-db", "key": "uri"}, "poolSize": 4}
        },
    },
    # A pull-through cache of Docker Hub (with credentials) and of a private registry.
    "upstreams": {
        "upstreams": [
            {
                "name": "docker-hub",
                "url": "https://registry-1.docker.io",
                "prefix": "docker.io",
                "username": "berthmirror",
                "passwordSecretRef": {"name": "hub-token", "key": "token"},
                "keepLast": 10,
                "maxIdleDays": 30,
            },
            {
                "name": "corp",
                "url": "https://registry.corp.example:8443",
                "prefix": "corp.example/team",
                "hosts": ["registry.corp.example:8443"],
                "caConfigMapRef": {"name": "corp-ca"},
                "tagTTLSeconds": 60,
            },
            {  # the account and its password from one Secret
                "name": "quay",
                "url": "https://quay.io",
                "prefix": "quay.io",
                "credentialsSecretRef": {"name": "quay-robot"},
            },
        ]
    },
    # Daily snapshots into a claim of their own, the last 14 kept.
    "backup": {
        "backup": {
            "intervalHours": 24,
            "keep": 14,
            "pvc": {"size": "40Gi", "storageClassName": "slow"},
        }
    },
    # The index in PostgreSQL, blobs on a shared volume: pods may overlap in a rollout.
    "pvc-postgresql": {
        "storage": {"pvc": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs"}},
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}},
    },
    # Webhooks: one with headers from a Secret (mounted), one plain and filtered.
    "notifications": {
        "notifications": {
            "endpoints": [
                {
                    "name": "audit",
                    "url": "https://hooks.example.com/registry",
                    "headersSecretRef": {"name": "audit-hook"},
                },
                {"name": "ci", "url": "http://ci.tools.svc/hook", "ignoreActions": ["delete"]},
            ]
        }
    },
    "emptydir-unlimited": {"storage": {"emptyDir": {}}},
    "ingress-tls": {
        "ingress": {
            "host": "registry.example.com",
            "className": "nginx",
            "tls": {"secretName": "registry-tls"},
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "0"},
        }
    },
    "ingress-plain": {
        "ingress": {"host": "registry.internal", "trustedProxies": ["10.244.0.0/16"]}
    },
    # Nodes pull through an Ingress with TLS: no node proxy.
    "node-proxy-off": {
        "ingress": {"host": "registry.example.com", "tls": {"secretName": "registry-tls"}},
        "nodeProxy": {"enabled": False},
    },
    "node-proxy-port": {
        "nodeProxy": {"port": 5050},
        "image": "registry.example.com/berth:1.2.3",
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "pull-a"}],
    },
    # One peer in this cluster (its password kept by the operator), one elsewhere.
    "replication": {
        "region": "eu-west",
        "storage": {"emptyDir": {}},
        "replication": {
            "peers": [
                {"name": "us-east", "registryRef": {"name": "main", "namespace": "us"}},
                {
                    "name": "ap",
                    "url": "https://registry.ap.example.com",
                    "credentialsSecretRef": {"name": "ap-replicator"},
                },
                {
                    "name": "mirror",
                    "kind": "oci",
                    "url": "https://mirror.example.com",
                    "credentialsSecretRef": {"name": "mirror-creds"},
                },
            ]
        },
    },
}
# What the operator resolved for the peers of a case (see reconcile._resolve_peers).
REPLICATION = {
    "replication": manifests.Replication(
        peers=(
            manifests.WiredPeer(
                "us-east", "https://main.us.svc:5000", "berth", "peer.registries.main.1",
                "main-replication", "us-east",
                "-----BEGIN CERTIFICATE-----\ngolden-us-ca\n-----END CERTIFICATE-----\n",
            ),
            manifests.WiredPeer(
                "ap", "https://registry.ap.example.com", "berth", "",
                "ap-replicator", "password", username_key="username",
            ),
        ),
        passwords={"us-east": "peer-password-golden"},
    )
}  # fmt: skip


def _render(raw_spec: dict[str, Any], case: str = "") -> list[rendering.Manifest]:
    spec = models.parse_spec(raw_spec, image=IMAGE, namespace=OWNER.namespace)
    return rendering.render(
        spec,
        OWNER,
        CREDENTIALS,
        REPLICATION.get(case, manifests.Replication()),
        node_access.port_of(spec, OWNER),
        serving=SERVING if spec.tls.mode == models.TLS_GENERATED else None,
    )


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the server config) as literal blocks: readable goldens."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(documents: list[rendering.Manifest]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = _dump(_render(CASES[case], case))
    path = GOLDEN / f"{case}.yaml"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with BERTH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path}; regenerate if intended"


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_server_config_is_what_the_server_accepts(case: str, tmp_path: Path) -> None:
    """The server's own loader reads every rendered config: the two cannot drift apart."""
    config_map = _by_kind(_render(CASES[case], case))["ConfigMap"]
    text = config_map["data"]["config.yaml"]
    # The loader reads the mounted back-end Secrets: give it files where the pod has them.
    for mount in (
        names.S3_CREDENTIALS_DIR,
        names.S3_CA_DIR,
        names.POSTGRESQL_DIR,
        names.TLS_DIR,
        names.CONFIG_DIR,
        f"{names.UPSTREAMS_DIR}/corp.ca",
    ):
        local = tmp_path / mount.strip("/")
        local.mkdir(parents=True)
        for name in (models.S3_ACCESS_KEY, models.S3_SECRET_KEY, names.POSTGRESQL_DSN_FILE):
            (local / name).write_text("postgresql://berth@db/berth\n")
        for name in (manifests.TLS_CERT_FILE, manifests.TLS_KEY_FILE):
            (local / name).write_text(SERVING.cert)
        for name, content in config_map["data"].items():
            (local / name).write_text(content)
        text = text.replace(f'"{mount}/', f'"{local}/')
    path = tmp_path / "config.yaml"
    path.write_text(text)
    loaded = server_config.load(path, env={})
    assert loaded.http.port == names.CONTAINER_PORT
    assert loaded.http.metrics_port == names.METRICS_PORT
    # Proxies are trusted only where there is one: without an Ingress, nobody's header counts.
    assert bool(loaded.http.trusted_proxies) == ("ingress" in CASES[case])
    # HTTPS unless switched off, from the mounted serving Secret.
    tls = loaded.http.tls
    if case == "tls-disabled":
        assert tls is None
    else:
        assert tls is not None and tls.certificate == tmp_path / "etc/berth/tls/tls.crt"
    if case == "replication":
        us_east = loaded.replication.peers[0]
        assert us_east.ca_file == tmp_path / "etc/berth/config" / names.peer_ca_file("us-east")
    if case == "s3-postgresql":
        s3 = loaded.storage.s3
        assert s3 is not None and loaded.storage.driver == "s3"
        assert (s3.bucket, s3.endpoint, s3.prefix) == (
            "berth-images",
            "https://s3.storage.svc:8333",
            "registries/main",
        )
        assert (s3.path_style, s3.redirect) == (False, True)
        assert s3.ca_file == tmp_path / "etc/berth/s3-ca" / names.S3_CA_FILE
    if "postgresql" in case:
        pg = loaded.metadata.postgresql
        assert loaded.metadata.driver == "postgresql" and pg is not None
        assert pg.connection_string() == "postgresql://berth@db/berth"
    else:
        assert loaded.metadata.driver == "sqlite"
    if case == "upstreams":
        hub, corp, quay = loaded.upstreams
        assert (hub.prefix, hub.username, hub.keep_last, hub.max_idle_days) == (
            "docker.io",
            "berthmirror",
            10,
            30.0,
        )
        assert hub.password_file == Path(names.UPSTREAMS_DIR) / "docker-hub" / "password"
        assert corp.hosts == ("registry.corp.example:8443",) and corp.tag_ttl_seconds == 60
        assert corp.ca_file == tmp_path / "etc/berth/upstreams/corp.ca/ca.crt"
        assert corp.username_file is None and corp.password_file is None
        assert quay.username_file == Path(names.UPSTREAMS_DIR) / "quay" / "username"
        assert quay.password_file == Path(names.UPSTREAMS_DIR) / "quay" / "password"
    if case == "backup":
        assert loaded.backup.interval_seconds == 86400 and loaded.backup.keep == 14
        assert loaded.backup.dir == Path(names.BACKUP_DIR)
    if case == "notifications":
        audit, ci = loaded.notifications.endpoints
        assert audit.headers_dir == Path(names.NOTIFICATIONS_DIR) / "audit"
        assert ci.ignore_actions == ("delete",) and ci.headers_dir is None


def test_every_kind_rendered_or_pruned_is_known_to_the_client() -> None:
    """The API client builds paths from its own table: a kind missing there fails only
    against a real API server (the in-memory one takes anything)."""
    kinds = {(d["apiVersion"], d["kind"]) for case in CASES for d in _render(CASES[case], case)}
    kinds |= {(api_version, kind) for api_version, kind, _ in reconcile.PRUNABLE}
    kinds.add(("v1", "ConfigMap"))  # kube-public/local-registry-hosting
    for api_version, kind in sorted(kinds):
        assert resources.lookup(api_version, kind).kind == kind


def test_no_stale_golden_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == set(CASES)


def _by_kind(documents: list[rendering.Manifest]) -> dict[str, rendering.Manifest]:
    return {doc["kind"]: doc for doc in documents}


def test_children_are_owned_by_the_registry_except_a_kept_claim() -> None:
    children = _by_kind(_render({"ingress": {"host": "r.example.com"}}))
    assert set(children) == {
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Ingress",
        "DaemonSet",
    }
    for kind, doc in children.items():
        refs = doc["metadata"].get("ownerReferences", [])
        if kind == "PersistentVolumeClaim":
            assert refs == []
            continue
        assert refs == [
            {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "Registry",
                "name": "main",
                "uid": OWNER.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert doc["metadata"]["labels"][names.REGISTRY_LABEL] == "main"


def test_claim_is_owned_when_asked_to_go_with_the_registry() -> None:
    pvc = _by_kind(_render({"storage": {"pvc": {"deleteOnRegistryDelete": True}}}))[
        "PersistentVolumeClaim"
    ]
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


@pytest.mark.parametrize(
    ("storage", "replicas", "strategy"),
    [
        ({"pvc": {}}, 1, "Recreate"),
        ({"pvc": {"accessModes": ["ReadWriteOncePod"]}}, 1, "Recreate"),
        # Two pods must never share one SQLite index, even on a volume both can mount.
        ({"pvc": {"accessModes": ["ReadWriteMany"]}}, 1, "Recreate"),
        ({"pvc": {"accessModes": ["ReadWriteMany"]}, "pg": True}, 1, "RollingUpdate"),
        ({"pvc": {}, "pg": True}, 1, "Recreate"),
        ({"s3": {"bucket": "bkt", "credentialsSecretRef": {"name": "k"}}, "pg": True}, 3,
         "RollingUpdate"),
        ({"emptyDir": {}}, 1, "RollingUpdate"),
    ],
)  # fmt: skip
def test_strategy_follows_the_volume(storage: dict[str, Any], replicas: int, strategy: str) -> None:
    raw: dict[str, Any] = {"storage": dict(storage), "replicas": replicas}
    if raw["storage"].pop("pg", False):
        raw["metadata"] = {"postgresql": {"connectionSecretRef": {"name": "db"}}}
    deployment = _by_kind(_render(raw))["Deployment"]
    assert deployment["spec"]["strategy"]["type"] == strategy


def _checksum(raw_spec: dict[str, Any], creds: credentials.Credentials = CREDENTIALS) -> str:
    spec = models.parse_spec(raw_spec, image=IMAGE)
    deployment = _by_kind(rendering.render(spec, OWNER, creds))["Deployment"]
    return str(deployment["spec"]["template"]["metadata"]["annotations"][names.CHECKSUM_ANNOTATION])


def test_checksum_changes_with_config_and_secrets_only() -> None:
    base = _checksum({})
    assert base == _checksum({})  # deterministic
    assert base == _checksum({"replicas": 0})  # not part of the pods' files
    assert base == _checksum({"resources": {"limits": {"memory": "1Gi"}}})
    assert base != _checksum({"logLevel": "debug"})  # config.yaml changed
    assert base != _checksum({"ingress": {"host": "r.example.com"}})  # external_url changed
    rotated = credentials.Credentials(
        CREDENTIALS.signing_key_pem,
        credentials.User("admin", "new", "$2b$12$new"),
        CREDENTIALS.replication,
    )
    assert base != _checksum({}, rotated)


def test_server_config_is_the_documented_format() -> None:
    spec = models.parse_spec({"logLevel": "warning"}, image=IMAGE)
    config = yaml.safe_load(manifests.server_config(spec, OWNER))
    assert config == {
        "http": {
            "addr": "0.0.0.0:5000",
            "external_url": "",
            "metrics_addr": "0.0.0.0:9090",
            "tls": {"certificate": "/etc/berth/tls/tls.crt", "key": "/etc/berth/tls/tls.key"},
        },
        "storage": {"root": "/var/lib/berth", "index": "sqlite"},
        "auth": {
            "service": "main.registries.svc:5000",
            "issuer": "berth",
            "htpasswd": "/etc/berth/auth/htpasswd",
            "policy": "/etc/berth/policy/policy.yaml",
            "signing_key": "/etc/berth/auth/token.key",
            "token_ttl_seconds": 300,
        },
        "ui": {"enabled": True},
        "log": {"level": "warning", "format": "json"},
    }
    # The server parses what the operator renders, with the UI off when asked.
    off = models.parse_spec({"ui": {"enabled": False}}, image=IMAGE)
    assert yaml.safe_load(manifests.server_config(off, OWNER))["ui"] == {"enabled": False}


def test_metrics_have_a_port_of_their_own_that_the_ingress_does_not_route() -> None:
    children = _by_kind(_render({"ingress": {"host": "r.example.com"}}))
    config = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    metrics_port = int(config["http"]["metrics_addr"].rsplit(":", 1)[1])
    container = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": names.CONTAINER_PORT, "metrics": metrics_port}
    # The probes stay on the registry's port (HTTPS: the kubelet does not verify).
    assert container["livenessProbe"]["httpGet"]["port"] == "https"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    service_ports = {p["name"]: p for p in children["Service"]["spec"]["ports"]}
    assert service_ports["metrics"]["targetPort"] == "metrics"
    assert service_ports["metrics"]["port"] == metrics_port
    backends = [
        path["backend"]["service"]
        for rule in children["Ingress"]["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [{"name": "main", "port": {"name": "https"}}]
    # ingress-nginx is told the backend speaks HTTPS.
    annotations = children["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


@pytest.mark.parametrize(
    ("ingress", "trusted"),
    [
        ({"host": "r.example.com"}, list(models.DEFAULT_TRUSTED_PROXIES)),
        ({"host": "r.example.com", "trustedProxies": ["10.244.0.0/16", "fd00::1"]},
         ["10.244.0.0/16", "fd00::1"]),
        ({"host": "r.example.com", "trustedProxies": []}, None),
        (None, None),
    ],
)  # fmt: skip
def test_trusted_proxies_only_with_an_ingress(
    ingress: dict[str, Any] | None, trusted: list[str] | None
) -> None:
    spec = models.parse_spec({"ingress": ingress} if ingress else {}, image=IMAGE)
    config = yaml.safe_load(manifests.server_config(spec, OWNER))
    assert config["http"].get("trusted_proxies") == trusted


def test_trusted_proxies_must_be_addresses() -> None:
    raw = {"ingress": {"host": "r.example.com", "trustedProxies": ["ingress-nginx"]}}
    with pytest.raises(models.InvalidSpec, match=r"trustedProxies\[\]: 'ingress-nginx' is not"):
        models.parse_spec(raw, image=IMAGE)


def test_pod_mounts_what_the_config_refers_to() -> None:
    children = _by_kind(_render({}))
    pod = children["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert container["command"][-1] == f"{mounts['config']}/config.yaml"
    assert volumes["config"]["configMap"]["name"] == children["ConfigMap"]["metadata"]["name"]
    secret_items = {i["path"] for i in volumes["auth"]["secret"]["items"]}
    for key in ("htpasswd", "signing_key"):
        directory, _, filename = config["auth"][key].rpartition("/")
        assert directory == mounts["auth"]
        assert filename in secret_items
        assert filename in children["Secret"]["data"]
    # The policy comes from the Repositories, in Secrets of its own (the main file and
    # its shards, in one projected volume): changing them must not roll the pods (the
    # server reloads them). Shards that are not written (yet) are optional.
    directory, _, filename = config["auth"]["policy"].rpartition("/")
    assert directory == mounts["policy"]
    projected = volumes["policy"]["projected"]
    assert projected["defaultMode"] == 0o440
    main, *shards = projected["sources"]
    assert main == {
        "secret": {"name": "main-policy", "items": [{"key": filename, "path": filename}]}
    }
    assert shards == [
        {"secret": {"name": f"main-policy-{i}", "optional": True}}
        for i in range(names.POLICY_SHARD_SLOTS)
    ]
    assert config["storage"]["root"] == mounts["data"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "main-data"
    # The plain passwords are in the Secret for admins, not in the pod.
    assert "admin-password" not in secret_items


def test_pod_security() -> None:
    pod = _by_kind(_render({}))["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_replication_peers_are_in_the_config_with_credential_files() -> None:
    children = _render(CASES["replication"], "replication")
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in children}
    config = yaml.safe_load(kinds[("ConfigMap", "main-config")]["data"]["config.yaml"])
    assert config["replication"] == {
        "region": "eu-west",
        "peers": [
            {
                "name": "us-east",
                "url": "https://main.us.svc:5000",
                "kind": "berth",
                "username": "peer.registries.main.1",
                "password_file": "/etc/berth/replication/us-east",
                # Its CA, copied into the ConfigMap: the server verifies the peer with it.
                "ca_file": f"/etc/berth/config/{names.peer_ca_file('us-east')}",
            },
            {
                "name": "ap",
                "url": "https://registry.ap.example.com",
                "kind": "berth",
                # A peer by URL: its Secret's username is a file too, read at every use.
                "username_file": "/etc/berth/replication/ap.username",
                "password_file": "/etc/berth/replication/ap",
            },
        ],
    }
    # Passwords are files from Secrets, never inline in the ConfigMap.
    assert "password:" not in kinds[("ConfigMap", "main-config")]["data"]["config.yaml"]
    secret = kinds[("Secret", "main-replication")]
    assert base64.b64decode(secret["data"]["us-east"]).decode() == "peer-password-golden"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    pod = kinds[("Deployment", "main")]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "replication")
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "main-replication", "items": [{"key": "us-east", "path": "us-east"}]}},
        {
            "secret": {
                "name": "ap-replicator",
                "items": [
                    {"key": "password", "path": "ap"},
                    {"key": "username", "path": "ap.username"},
                ],
                "optional": True,  # a user's Secret: a key gone later fails the peer only
            }
        },
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "replication")
    assert mount["mountPath"] == "/etc/berth/replication"


def test_no_peers_no_replication_section_nor_volume() -> None:
    children = _by_kind(_render({"region": "eu"}))
    config = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert "replication" not in config
    volumes = children["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert "replication" not in {v["name"] for v in volumes}


def test_peer_checksum_ignores_passwords() -> None:
    """The server reads peer password files on every use: a new one needs no restart."""

    def checksum(password: str) -> str:
        replication = manifests.Replication(
            REPLICATION["replication"].peers, passwords={"us-east": password}
        )
        spec = models.parse_spec(CASES["replication"], image=IMAGE, namespace=OWNER.namespace)
        deployment = _by_kind(rendering.render(spec, OWNER, CREDENTIALS, replication))
        annotations = deployment["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        return str(annotations[names.CHECKSUM_ANNOTATION])

    assert checksum("one") == checksum("two")


def test_an_upstreams_ca_and_another_upstreams_credentials_never_share_a_volume() -> None:
    """Upstream names are DNS labels: "corp" with a CA and "corp-ca" with credentials
    rendered one volume name and one mount path twice (found by review)."""
    spec = {
        "upstreams": [
            {
                "name": "corp",
                "url": "https://a.example",
                "prefix": "a.example",
                "caConfigMapRef": {"name": "corp-ca"},
            },
            {
                "name": "corp-ca",
                "url": "https://b.example",
                "prefix": "b.example",
                "credentialsSecretRef": {"name": "b-robot"},
            },
        ]
    }
    pod = _by_kind(_render(spec, "upstream-names"))["Deployment"]["spec"]["template"]["spec"]
    volumes = [v["name"] for v in pod["volumes"]]
    mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
    assert len(volumes) == len(set(volumes)) and len(mounts) == len(set(mounts))
