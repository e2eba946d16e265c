"""Render the children of one Registry from jinja2 templates (one template per kind)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import yaml

from registry_operator import credentials as creds
from registry_operator import models
from registry_operator.rendering import names

Manifest = dict[str, Any]

# The serving Secret's keys (cert-manager's layout, kubernetes.io/tls plus ca.crt).
TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE = "tls.crt", "tls.key", "ca.crt"
# What the pod mounts from the Secret: everything the server reads, nothing more.
MOUNTED_SECRET_KEYS = (creds.SIGNING_KEY, creds.HTPASSWD)
# The node proxy: a relay with a thread per direction of each connection; its memory
# is the interpreter's (~14 MiB) plus ~40 KiB per open connection (at most 256).
NODE_PROXY_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "10m", "memory": "32Mi"},
    "limits": {"memory": "128Mi"},
}
NODE_PROXY_DRAIN_SECONDS = 10  # open pulls get this long to finish when a proxy pod stops


@dataclasses.dataclass(frozen=True)
class WiredPeer:
    """A replication peer whose credentials are known: it goes into the server config."""

    name: str
    url: str
    kind: str
    username: str  # written into the config; "" when it is read from the Secret
    secret: str  # the Secret (in the Registry's namespace) holding the password
    key: str  # its key
    ca_pem: str | None = None  # a same-cluster peer's CA (its spec.tls), copied here
    # The Secret's key holding the username (a peer by URL): mounted beside the password
    # and read by the server at every use, so a rotated account needs no new config.
    username_key: str | None = None


@dataclasses.dataclass(frozen=True)
class ServingSecrets:
    """spec.tls Generated: the Registry's CA and the serving certificate it issued (PEM)."""

    ca_cert: str
    ca_key: str
    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class Replication:
    """The peers to render and the passwords the operator keeps for same-cluster ones."""

    peers: tuple[WiredPeer, ...] = ()
    passwords: Mapping[str, str] = dataclasses.field(default_factory=dict)  # peer -> password


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("registry_operator.rendering", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # the output is YAML, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # JSON is valid YAML: every value goes through this filter, so no quoting bugs.
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env


def text(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


# libyaml's loader when PyYAML has it: the access reconcile renders a Secret for every
# granted namespace on every pass (to compare it with what is there), hundreds at a time.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def manifest(template: str, **context: Any) -> Manifest:
    loaded = yaml.load(text(template, **context), Loader=_LOADER)
    if not isinstance(loaded, dict):
        raise TypeError(f"{template} did not render a mapping")
    return loaded


def owner_references(owner: models.Owner) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": owner.api_version,
            "kind": owner.kind,
            "name": owner.name,
            "uid": owner.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def server_config(
    spec: models.Spec,
    owner: models.Owner,
    peers: tuple[WiredPeer, ...] = (),
    node_port: int | None = None,
) -> str:
    """The registry server's config.yaml, in the docs/configuration.md format;
    `node_port` is the port its node proxies serve on the nodes' loopback."""
    in_cluster = names.in_cluster_url(owner.name, owner.namespace, spec.scheme)
    return text(
        "registry-config.yaml.j2",
        name=owner.name,
        namespace=owner.namespace,
        addr=f"0.0.0.0:{names.CONTAINER_PORT}",
        metrics_addr=f"0.0.0.0:{names.METRICS_PORT}",
        # Behind the Ingress every client has the controller's address; its
        # X-Forwarded-For names the client (the failed-login limiter keys on it).
        trusted_proxies=list(spec.ingress.trusted_proxies) if spec.ingress else [],
        # Without an Ingress clients reach the server by many names (Service DNS, a
        # port-forward, a node port); leaving this empty makes the token realm follow the
        # address each client used.
        external_url=spec.ingress.url if spec.ingress else "",
        data_dir=names.DATA_DIR,
        service=spec.ingress.host if spec.ingress else in_cluster.split("://", 1)[1],
        htpasswd_file=f"{names.AUTH_DIR}/{creds.HTPASSWD}",
        policy_file=f"{names.POLICY_DIR}/{names.POLICY_FILE}",
        signing_key_file=f"{names.AUTH_DIR}/{creds.SIGNING_KEY}",
        log_level=spec.log_level,
        ui_enabled=spec.ui,
        region=spec.region,
        peers=peers,
        peer_ca_files={
            peer.name: f"{names.CONFIG_DIR}/{names.peer_ca_file(peer.name)}"
            for peer in peers
            if peer.ca_pem
        },
        replication_dir=names.REPLICATION_DIR,
        tls_certificate_file=f"{names.TLS_DIR}/{TLS_CERT_FILE}" if spec.tls.enabled else None,
        # Kubelets speak plain HTTP to the node proxy, which re-encrypts: the token realm
        # their challenges name must be http://localhost:<port>, not https://.
        relayed_hosts=(
            [f"localhost:{node_port}", f"127.0.0.1:{node_port}"]
            if spec.tls.enabled and node_port is not None
            else []
        ),
        tls_key_file=f"{names.TLS_DIR}/{TLS_KEY_FILE}",
        webhooks=spec.webhooks,
        notifications_dir=names.NOTIFICATIONS_DIR,
        # Rolling updates (no volume of its own): after SIGTERM a pod keeps serving,
        # unready, until the Service has stopped routing to it; well inside the pod's
        # default 30 s grace period with the server's 10 s graceful shutdown after it.
        drain_seconds=(
            names.DRAIN_SECONDS if not isinstance(spec.storage, models.PvcStorage) else 0
        ),
        **_backend_files(spec),
    )


def _backend_files(spec: models.Spec) -> dict[str, Any]:
    """The external back ends of the config, and where their mounted secrets are."""
    s3 = spec.storage if isinstance(spec.storage, models.S3Storage) else None
    return {
        "s3": s3,
        "s3_access_key_file": f"{names.S3_CREDENTIALS_DIR}/{models.S3_ACCESS_KEY}",
        "s3_secret_key_file": f"{names.S3_CREDENTIALS_DIR}/{models.S3_SECRET_KEY}",
        "s3_ca_file": (
            f"{names.S3_CA_DIR}/{names.S3_CA_FILE}" if s3 is not None and s3.ca else None
        ),
        "postgresql": spec.postgresql,
        "backup": spec.backup,
        "backup_dir": names.BACKUP_DIR,
        "upstreams": spec.upstreams,
        "upstreams_dir": names.UPSTREAMS_DIR,
        "postgresql_dsn_file": f"{names.POSTGRESQL_DIR}/{names.POSTGRESQL_DSN_FILE}",
    }


def _secret_volume(
    name: str, path: str, secret: str, items: dict[str, str], optional: bool = False
) -> dict[str, Any]:
    """A read-only volume of a Secret's keys (`items`: key -> file name)."""
    source: dict[str, Any] = {
        "secretName": secret,
        "items": [{"key": key, "path": file} for key, file in items.items()],
        "defaultMode": 288,
    }
    if optional:
        source["optional"] = True
    return {"name": name, "path": path, "kind": "secret", "writable": False, "source": source}


def tls_secret_name(spec: models.Spec, registry: str) -> str:
    """The Secret the server's certificate is mounted from (spec.tls enabled)."""
    return spec.tls.secret_name or names.serving_secret(registry)


def _ca_volume(name: str, path: str, ref: models.KeyRef, file: str) -> dict[str, Any]:
    """A read-only volume holding one ConfigMap key (a CA bundle) as `file`."""
    source = {"name": ref.name, "items": [{"key": ref.key, "path": file}]}
    return {"name": name, "path": path, "kind": "configMap", "writable": False, "source": source}


def extra_volumes(spec: models.Spec, registry: str) -> list[dict[str, Any]]:
    """Volumes beyond the server's own: the user's S3 and PostgreSQL Secrets (and CA),
    read-only, and the backup claim: name, mount path, and the volume source (`kind`:
    secret, configMap or persistentVolumeClaim)."""
    found: list[dict[str, Any]] = []
    if spec.tls.enabled:
        # The key and certificate only (the CA is not the server's business); the server
        # reloads them when the kubelet swaps in a renewed pair, so renewal rolls no pod.
        keys = {TLS_CERT_FILE: TLS_CERT_FILE, TLS_KEY_FILE: TLS_KEY_FILE}
        found.append(_secret_volume("tls", names.TLS_DIR, tls_secret_name(spec, registry), keys))
    storage = spec.storage
    if isinstance(storage, models.S3Storage):
        keys = {key: key for key in (models.S3_ACCESS_KEY, models.S3_SECRET_KEY)}
        found.append(
            _secret_volume(
                "s3-credentials", names.S3_CREDENTIALS_DIR, storage.credentials_secret, keys
            )
        )
        if storage.ca is not None:
            found.append(_ca_volume("s3-ca", names.S3_CA_DIR, storage.ca, names.S3_CA_FILE))
    for up in spec.upstreams:
        # Optional: a missing Secret fails that upstream's fetches (with a clear error),
        # never the registry's start.
        if up.password is not None:
            found.append(
                _secret_volume(
                    f"upstream-{up.name}",
                    f"{names.UPSTREAMS_DIR}/{up.name}",
                    up.password.name,
                    {up.password.key: "password"},
                    optional=True,
                )
            )
        elif up.credentials_secret is not None:
            found.append(
                _secret_volume(
                    f"upstream-{up.name}",
                    f"{names.UPSTREAMS_DIR}/{up.name}",
                    up.credentials_secret,
                    {"username": "username", "password": "password"},
                    optional=True,
                )
            )
        if up.ca is not None:
            # Neither the volume nor the path can be another upstream's (its name is a
            # DNS label: "a" and "a-ca" clashed when the CA's were upstream-a-ca).
            path = f"{names.UPSTREAMS_DIR}/{up.name}.ca"
            found.append(_ca_volume(f"upca-{up.name}", path, up.ca, "ca.crt"))
    if spec.backup is not None:
        found.append(
            {
                "name": "backup",
                "path": names.BACKUP_DIR,
                "kind": "persistentVolumeClaim",
                "source": {"claimName": names.backup_pvc(registry)},
                "writable": True,
            }
        )
    if spec.postgresql is not None:
        ref = spec.postgresql.connection
        found.append(
            _secret_volume(
                "postgresql", names.POSTGRESQL_DIR, ref.name, {ref.key: names.POSTGRESQL_DSN_FILE}
            )
        )
    return found


def _b64(plain: Mapping[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode("ascii") for key, value in plain.items()}


def secret_data(owner: models.Owner, credentials: creds.Credentials) -> dict[str, str]:
    plain = {
        creds.SIGNING_KEY: credentials.signing_key_pem,
        creds.HTPASSWD: credentials.htpasswd,
        creds.ADMIN_USERNAME: credentials.admin.name,
        creds.ADMIN_PASSWORD: credentials.admin.password,
        creds.REPLICATION_USERNAME: credentials.replication.name,
        creds.REPLICATION_PASSWORD: credentials.replication.password,
    }
    return _b64(plain)


def _replication_sources(peers: tuple[WiredPeer, ...]) -> list[dict[str, Any]]:
    """Projected-volume sources: each peer's password as a file named like the peer, and
    the username of one that reads it from its Secret as <peer>.username (peer names
    are DNS labels: no dot, so no clash)."""
    by_secret: dict[str, list[dict[str, str]]] = {}
    users: set[str] = set()
    for peer in peers:
        items = by_secret.setdefault(peer.secret, [])
        items.append({"key": peer.key, "path": peer.name})
        if peer.username_key is not None:
            items.append({"key": peer.username_key, "path": f"{peer.name}.username"})
            users.add(peer.secret)
    # A user's Secret is optional: a key removed after the peer was wired fails that
    # peer's requests (the server reads the files at each use), not a new pod's start.
    return [
        {"secret": {"name": name, "items": items, **({"optional": True} if name in users else {})}}
        for name, items in by_secret.items()
    ]


def checksum(config_map: Manifest, secret: Manifest, backends: str = "") -> str:
    """A digest of everything the pod reads from its ConfigMap and Secret, and of the
    user's back-end Secrets (`backends`, their digest): the server reads those once, so
    rotated S3 keys or a new connection string roll the pods."""
    parts = [config_map["data"], secret["data"], *([backends] if backends else [])]
    content = json.dumps(parts, sort_keys=True)
    return "sha256:" + hashlib.sha256(content.encode()).hexdigest()


def node_proxy(spec: models.Spec, owner: models.Owner, port: int) -> Manifest:
    """The DaemonSet relaying `localhost:<port>` on every node to the Registry's Service."""
    name, namespace = owner.name, owner.namespace
    return manifest(
        "daemonset.yaml.j2",
        name=names.node_proxy(name),
        namespace=namespace,
        labels=names.node_proxy_labels(name),
        selector=names.node_proxy_selector_labels(name),
        owner_references=owner_references(owner),
        spec=spec,
        port=port,
        upstream=names.service_host(name, namespace),
        upstream_ca=f"{names.TLS_CA_DIR}/{TLS_CA_FILE}" if spec.tls.enabled else None,
        tls_secret=tls_secret_name(spec, name),
        tls_ca_file=TLS_CA_FILE,
        tls_ca_dir=names.TLS_CA_DIR,
        drain_seconds=NODE_PROXY_DRAIN_SECONDS,
        resources=NODE_PROXY_RESOURCES,
        run_as=names.RUN_AS,
    )


def local_registry_hosting_text(host: str, runtime_host: str, cluster_host: str) -> str:
    """The KEP-1755 LocalRegistryHostingV1 document (YAML; JSON is YAML)."""
    document = {
        "host": host,
        "hostFromContainerRuntime": runtime_host,
        "hostFromClusterNetwork": cluster_host,
        "help": names.LOCAL_REGISTRY_HOSTING_HELP,
    }
    return yaml.safe_dump(document, sort_keys=False)


def local_registry_hosting(
    registry: str, namespace: str, port: int, ingress_host: str | None = None
) -> Manifest:
    """kube-public/local-registry-hosting naming one Registry. Not owned (owner
    references cannot cross namespaces): its labels name the Registry instead."""
    runtime_host = names.node_host(port)
    return manifest(
        "local-registry-hosting.yaml.j2",
        name=names.LOCAL_REGISTRY_HOSTING,
        namespace=names.LOCAL_REGISTRY_HOSTING_NAMESPACE,
        labels=names.access_labels(registry, namespace, names.LOCAL_REGISTRY_HOSTING_COMPONENT),
        key=names.LOCAL_REGISTRY_HOSTING_KEY,
        hosting=local_registry_hosting_text(
            ingress_host or runtime_host, runtime_host, names.service_host(registry, namespace)
        ),
    )


def port_name(spec: models.Spec) -> str:
    """The registry port's name on the container, the Service and the Ingress backend:
    meshes and controllers read the protocol from it (and from appProtocol)."""
    return "https" if spec.tls.enabled else "http"


# The controllers that read an annotation for the protocol to the backend. Others:
# docs/operator.md#tls-inside-the-cluster. The user's own annotations win.
BACKEND_HTTPS_ANNOTATIONS: Mapping[str, str] = {
    "nginx.ingress.kubernetes.io/backend-protocol": "HTTPS",
}


def ingress_annotations(spec: models.Spec) -> dict[str, str]:
    assert spec.ingress is not None
    if not spec.tls.enabled:
        return dict(spec.ingress.annotations)
    return {**BACKEND_HTTPS_ANNOTATIONS, **spec.ingress.annotations}


def serving_secrets(owner: models.Owner, serving: ServingSecrets) -> list[Manifest]:
    """spec.tls Generated: the CA Secret (its key read by the operator only) and the
    serving Secret the pods and node proxies mount (kubernetes.io/tls, plus ca.crt)."""
    common: dict[str, Any] = {
        "namespace": owner.namespace,
        "owner_references": owner_references(owner),
    }
    ca = manifest(
        "secret.yaml.j2",
        name=names.serving_ca_secret(owner.name),
        labels=names.labels(owner.name, "certificate-authority"),
        data=_b64({"ca.crt": serving.ca_cert, "ca.key": serving.ca_key}),
        **common,
    )
    tls = manifest(
        "secret.yaml.j2",
        name=names.serving_secret(owner.name),
        labels=names.labels(owner.name, "serving-certificate"),
        data=_b64(
            {TLS_CERT_FILE: serving.cert, TLS_KEY_FILE: serving.key, TLS_CA_FILE: serving.ca_cert}
        ),
        type="kubernetes.io/tls",
        **common,
    )
    return [ca, tls]


def policy_sources(registry: str, slots: int) -> list[dict[str, Any]]:
    """The policy volume's sources: the main file, then `slots` optional shard Secrets."""
    main = {
        "secret": {
            "name": names.policy_secret(registry),
            "items": [{"key": names.POLICY_FILE, "path": names.POLICY_FILE}],
        }
    }
    shards = [
        {"secret": {"name": names.policy_shard_secret(registry, i), "optional": True}}
        for i in range(slots)
    ]
    return [main, *shards]


def render(
    spec: models.Spec,
    owner: models.Owner,
    credentials: creds.Credentials,
    replication: Replication = Replication(),
    node_port: int | None = None,
    policy_slots: int = names.POLICY_SHARD_SLOTS,
    backends: str = "",
    serving: ServingSecrets | None = None,
) -> list[Manifest]:
    """All children of a Registry, in the order they should be applied.

    The policy Secrets are not among them: they are written from the Repositories
    (`access`, `rendering.policy`); `policy_slots` is how many shard Secrets the pods
    mount (`rendering.policy.slots`). `node_port` is the port its node proxy serves
    (`node_access.served_port`); None renders no proxy. `backends` is a digest of the
    S3 and PostgreSQL Secrets the pods mount (`backend_digest`). `serving` is the CA and
    certificate of spec.tls Generated (`serving_tls.plan`); they come first, as a pod
    must never start before the files it mounts exist.
    """
    name, namespace = owner.name, owner.namespace
    owned = owner_references(owner)
    common: dict[str, Any] = {"namespace": namespace, "owner_references": owned}

    config_map = manifest(
        "configmap.yaml.j2",
        name=names.config_map(name),
        labels=names.labels(name, "config"),
        data={
            "config.yaml": server_config(spec, owner, replication.peers, node_port),
            # Same-cluster peers' CAs: in the ConfigMap, so a new CA rolls the pods
            # (the server reads a peer's CA once).
            **{
                names.peer_ca_file(peer.name): peer.ca_pem
                for peer in replication.peers
                if peer.ca_pem
            },
        },
        **common,
    )
    secret = manifest(
        "secret.yaml.j2",
        name=names.secret(name),
        labels=names.labels(name, "credentials"),
        data=secret_data(owner, credentials),
        **common,
    )
    manifests = [config_map, secret]
    if serving is not None:
        manifests[:0] = serving_secrets(owner, serving)
    if replication.passwords:
        # Before the config that names the password files: a pod must never start with
        # a config whose files are not there yet.
        manifests.insert(
            0,
            manifest(
                "secret.yaml.j2",
                name=names.replication_secret(name),
                labels=names.labels(name, "replication"),
                data=_b64(dict(sorted(replication.passwords.items()))),
                **common,
            ),
        )

    storage = spec.storage
    pvc_name = None
    if isinstance(storage, models.PvcStorage):
        pvc_name = names.pvc(name)
        manifests.append(
            manifest(
                "persistentvolumeclaim.yaml.j2",
                name=pvc_name,
                namespace=namespace,
                labels=names.labels(name, "storage"),
                # Data outlives its Registry unless the user asked otherwise.
                owner_references=owned if storage.delete_on_registry_delete else [],
                storage=storage,
            )
        )
    if spec.backup is not None:
        manifests.append(
            manifest(
                "persistentvolumeclaim.yaml.j2",
                name=names.backup_pvc(name),
                namespace=namespace,
                labels=names.labels(name, "backup"),
                owner_references=[],  # backups outlive their Registry, like its data
                storage=spec.backup.volume,
            )
        )
    server_labels = names.labels(name, "server")
    manifests.append(
        manifest(
            "deployment.yaml.j2",
            name=names.deployment(name),
            labels=server_labels,
            selector=names.selector_labels(name),
            spec=spec,
            # A ReadWriteOnce volume cannot be mounted by the old and the new pod at
            # once, and two pods must never share one SQLite index, even on an RWX one.
            recreate=isinstance(storage, models.PvcStorage)
            and (not storage.shared or spec.postgresql is None),
            extra_volumes=extra_volumes(spec, name),
            checksum_annotation=names.CHECKSUM_ANNOTATION,
            checksum=checksum(config_map, secret, backends),
            run_as=names.RUN_AS,
            port=names.CONTAINER_PORT,
            port_name=port_name(spec),
            probe_scheme=spec.scheme.upper(),
            metrics_port=names.METRICS_PORT,
            metrics_port_name=names.METRICS_PORT_NAME,
            config_file=names.CONFIG_FILE,
            config_dir=names.CONFIG_DIR,
            auth_dir=names.AUTH_DIR,
            policy_dir=names.POLICY_DIR,
            policy_sources=policy_sources(name, policy_slots),
            replication_dir=names.REPLICATION_DIR,
            replication_sources=_replication_sources(replication.peers),
            webhook_volumes=[
                {"volume": names.webhook_volume(w.name), "secret": w.headers_secret, "name": w.name}
                for w in spec.webhooks
                if w.headers_secret
            ],
            notifications_dir=names.NOTIFICATIONS_DIR,
            data_dir=names.DATA_DIR,
            config_map_name=names.config_map(name),
            secret_name=names.secret(name),
            mounted_secret_items=[{"key": key, "path": key} for key in MOUNTED_SECRET_KEYS],
            pvc_name=pvc_name,
            **common,
        )
    )
    manifests.append(
        manifest(
            "service.yaml.j2",
            name=names.service(name),
            labels=server_labels,
            selector=names.selector_labels(name),
            port=names.CONTAINER_PORT,
            port_name=port_name(spec),
            metrics_port=names.METRICS_PORT,
            metrics_port_name=names.METRICS_PORT_NAME,
            **common,
        )
    )
    if spec.replicas > 1:
        manifests.append(
            manifest(
                "poddisruptionbudget.yaml.j2",
                name=names.disruption_budget(name),
                labels=server_labels,
                selector=names.selector_labels(name),
                **common,
            )
        )
    if spec.ingress is not None:
        manifests.append(
            manifest(
                "ingress.yaml.j2",
                name=names.ingress(name),
                labels=server_labels,
                ingress=spec.ingress,
                annotations=ingress_annotations(spec),
                service_name=names.service(name),
                port_name=port_name(spec),
                **common,
            )
        )
    if node_port is not None:
        manifests.append(node_proxy(spec, owner, node_port))
    return manifests
