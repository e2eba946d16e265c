"""Typed, frozen views of the `Registry` and `Repository` custom resources. Pure: no I/O.

The API server already enforces the CRD schema and CEL rules; parsing checks again so a
body that slipped past them (an old CRD, a hand-made test body) fails with a clear
`InvalidSpec` instead of a KeyError deep inside rendering.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from registry_operator import API_VERSION

KIND = "Registry"
PLURAL = "registries"
REPOSITORY_KIND = "Repository"
REPOSITORY_PLURAL = "repositories"
ROTATE_ANNOTATION = "berth.dev/rotate"
DEFAULT_ROTATION_OVERLAP = 600.0  # seconds an old credential stays valid after a rotation
MIN_ROTATION_INTERVAL = 3600.0  # the shortest automatic rotation interval
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/berth-dev/berth"
DEFAULT_PVC_SIZE = "10Gi"
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")
LOG_LEVELS = ("debug", "info", "warning", "error")
# spec.tls.mode: a CA and certificate the operator makes, a user's Secret, or plain HTTP.
TLS_GENERATED, TLS_SECRET, TLS_DISABLED = "Generated", "Secret", "Disabled"
TLS_MODES = (TLS_GENERATED, TLS_SECRET, TLS_DISABLED)
# On a Registry: "true" makes it the one named in kube-public/local-registry-hosting
# (KEP-1755), "false" keeps it out of that ConfigMap (see node_access.hosting).
LOCAL_REGISTRY_HOSTING_ANNOTATION = "berth.dev/local-registry-hosting"
NODE_PORT_MIN, NODE_PORT_MAX = 1024, 65535

_QUANTITY = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?\Z"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
# A Secret's or ConfigMap's data key.
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}\Z")
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


class InvalidSpec(ValueError):
    """The custom resource cannot be turned into manifests; retrying will not help."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


WEBHOOK_ACTIONS = ("push", "delete")


def default_image() -> str:
    """The server image matching this operator's own version."""
    try:
        version = importlib.metadata.version("berth")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        version = "latest"
    return f"{DEFAULT_IMAGE_REPOSITORY}:{version}"


@dataclasses.dataclass(frozen=True)
class Owner:
    """The identity of the custom resource, as needed for ownerReferences and events."""

    name: str
    namespace: str
    uid: str
    api_version: str = API_VERSION
    kind: str = KIND


@dataclasses.dataclass(frozen=True)
class PvcStorage:
    size: str = DEFAULT_PVC_SIZE
    storage_class_name: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)
    delete_on_registry_delete: bool = False

    @property
    def shared(self) -> bool:
        return "ReadWriteMany" in self.access_modes


@dataclasses.dataclass(frozen=True)
class EmptyDirStorage:
    size_limit: str | None = None


@dataclasses.dataclass(frozen=True)
class KeyRef:
    """A key of a Secret or ConfigMap in the Registry's namespace."""

    name: str
    key: str


# The keys a storage.s3 credentials Secret holds (distribution's and the AWS CLI's names).
S3_ACCESS_KEY = "accessKeyID"
S3_SECRET_KEY = "secretAccessKey"


@dataclasses.dataclass(frozen=True)
class S3Storage:
    """Blobs in an S3-compatible object store; the index is then in PostgreSQL."""

    bucket: str
    credentials_secret: str  # keys S3_ACCESS_KEY and S3_SECRET_KEY
    endpoint: str = ""  # empty: AWS's endpoint for the region
    region: str = "us-east-1"
    prefix: str = ""
    path_style: bool = True
    redirect: bool = False
    ca: KeyRef | None = None  # a ConfigMap key holding the store's CA bundle (PEM)


Storage = PvcStorage | EmptyDirStorage | S3Storage


@dataclasses.dataclass(frozen=True)
class PostgresMetadata:
    """The metadata index in PostgreSQL: a Secret key holding a libpq connection string."""

    connection: KeyRef
    pool_size: int = 10


DEFAULT_DSN_KEY = "dsn"


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A registry this one mirrors on demand (a pull-through cache): `<prefix>/x` here is
    `x` there (docs/pull-through-cache.md)."""

    name: str
    url: str
    prefix: str
    hosts: tuple[str, ...] = ()
    username: str = ""
    password: KeyRef | None = None  # a Secret key, mounted; read at each use
    # Or both from one Secret (keys `username` and `password`), mounted; read at each use.
    credentials_secret: str | None = None
    ca: KeyRef | None = None  # a ConfigMap key holding extra CA certificates (PEM)
    tag_ttl_seconds: int = 300
    timeout_seconds: int = 5
    keep_last: int = 0
    max_idle_days: int = 0


@dataclasses.dataclass(frozen=True)
class Backup:
    """Scheduled snapshots of a registry on a claim or emptyDir with SQLite, written by
    its server into a claim of their own (`<name>-backup`)."""

    interval_hours: int = 24
    keep: int = 7
    volume: PvcStorage = dataclasses.field(default_factory=PvcStorage)


@dataclasses.dataclass(frozen=True)
class Tls:
    secret_name: str


@dataclasses.dataclass(frozen=True)
class ServingTls:
    """spec.tls: whether the server's own listener speaks TLS, and whose certificate.
    With TLS_SECRET, `secret_name` is the user's Secret (cert-manager's layout:
    tls.crt, tls.key and ca.crt, the CA that clients in the cluster are to trust)."""

    mode: str = TLS_GENERATED
    secret_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != TLS_DISABLED


# Where Ingress controllers run in most clusters (pod and node networks are private
# ranges): their X-Forwarded-For names the client. RFC 1918, shared address space, ULA.
DEFAULT_TRUSTED_PROXIES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
)


@dataclasses.dataclass(frozen=True)
class Ingress:
    host: str
    class_name: str | None = None
    tls: Tls | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"


PEER_KINDS = ("berth", "oci")


@dataclasses.dataclass(frozen=True)
class RegistryRef:
    name: str
    namespace: str


@dataclasses.dataclass(frozen=True)
class Peer:
    """A replication peer: a Registry of this cluster, or a URL with a credentials Secret."""

    name: str
    kind: str = "berth"
    registry: RegistryRef | None = None
    url: str | None = None
    credentials_secret: str | None = None  # keys `username` and `password`


@dataclasses.dataclass(frozen=True)
class Webhook:
    """A notification endpoint; its headers come from a Secret mounted into the pod."""

    name: str
    url: str
    headers_secret: str | None = None
    ignore_actions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeProxy:
    """The node-local proxy: kubelets pull `localhost:<port>/...` on every node."""

    enabled: bool = True
    port: int | None = None  # None: derived from the Registry's namespace and name


@dataclasses.dataclass(frozen=True)
class Spec:
    image: str
    region: str | None = None
    replicas: int = 1
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    resources: Mapping[str, Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: DEFAULT_RESOURCES
    )
    log_level: str = "info"
    ui: bool = True  # the server's web UI at /ui/ (docs/ui.md)
    storage: Storage = dataclasses.field(default_factory=PvcStorage)
    postgresql: PostgresMetadata | None = None  # None: SQLite on the data volume
    backup: Backup | None = None
    upstreams: tuple[Upstream, ...] = ()
    ingress: Ingress | None = None
    peers: tuple[Peer, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    node_proxy: NodeProxy = dataclasses.field(default_factory=NodeProxy)
    tls: ServingTls = dataclasses.field(default_factory=ServingTls)

    @property
    def scheme(self) -> str:
        return "https" if self.tls.enabled else "http"


@dataclasses.dataclass(frozen=True)
class Registry:
    owner: Owner
    generation: int
    spec: Spec
    deleting: bool = False
    created: str = ""  # metadata.creationTimestamp: the older of two keeps a node port
    hosting: bool | None = None  # the local-registry-hosting annotation, when set


def parse_registry(body: Mapping[str, Any], *, image: str | None = None) -> Registry:
    """Parse a whole custom resource body; `image` overrides the default server image."""
    meta = _mapping(body.get("metadata"), "metadata")
    owner = Owner(
        name=_str(meta.get("name"), "metadata.name"),
        namespace=_str(meta.get("namespace"), "metadata.namespace"),
        uid=_str(meta.get("uid", ""), "metadata.uid"),
    )
    generation = meta.get("generation", 0)
    spec = parse_spec(
        _mapping(body.get("spec", {}), "spec"), image=image, namespace=owner.namespace
    )
    annotations = _mapping(meta.get("annotations") or {}, "metadata.annotations")
    hosting = annotations.get(LOCAL_REGISTRY_HOSTING_ANNOTATION)
    if hosting is not None and hosting not in ("true", "false"):
        raise InvalidSpec(
            f"metadata.annotations[{LOCAL_REGISTRY_HOSTING_ANNOTATION}]",
            f'must be "true" or "false", not {hosting!r}',
        )
    return Registry(
        owner=owner,
        generation=int(generation),
        spec=spec,
        deleting=meta.get("deletionTimestamp") is not None,
        created=str(meta.get("creationTimestamp", "")),
        hosting=None if hosting is None else hosting == "true",
    )


def parse_spec(raw: Mapping[str, Any], *, image: str | None = None, namespace: str = "") -> Spec:
    """Parse `.spec`; `image` replaces the default server image (tests pin it) and
    `namespace` is where a peer's registryRef without a namespace points."""
    replicas = raw.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise InvalidSpec("spec.replicas", "must be a non-negative integer")
    storage = _storage(_mapping(raw.get("storage", {"pvc": {}}), "spec.storage"))
    postgresql = _postgresql(raw.get("metadata"))
    if isinstance(storage, S3Storage) and postgresql is None:
        raise InvalidSpec(
            "spec.metadata.postgresql",
            "storage.s3 leaves no volume for the SQLite index: set metadata.postgresql",
        )
    if replicas > 1 and not (isinstance(storage, S3Storage) and postgresql is not None):
        # SQLite's WAL cannot be shared between hosts, even on a ReadWriteMany volume.
        raise InvalidSpec(
            "spec.replicas",
            "replicas > 1 requires storage.s3 and metadata.postgresql (SQLite serves one pod only)",
        )
    backup = _backup(raw.get("backup"))
    if backup is not None and (isinstance(storage, S3Storage) or postgresql is not None):
        raise InvalidSpec(
            "spec.backup",
            "scheduled backups copy a volume and its SQLite index; with S3 or PostgreSQL"
            " back up the bucket and the database with their own tools",
        )
    region = raw.get("region")
    peers = _peers(raw.get("replication"), namespace)
    if peers and region is None:
        raise InvalidSpec("spec.region", "is required when spec.replication.peers are set")
    return Spec(
        image=_str(raw.get("image") or image or default_image(), "spec.image"),
        region=None if region is None else _str(region, "spec.region"),
        replicas=replicas,
        image_pull_policy=_choice(
            raw.get("imagePullPolicy", "IfNotPresent"), PULL_POLICIES, "spec.imagePullPolicy"
        ),
        image_pull_secrets=tuple(
            _str(
                _mapping(item, "spec.imagePullSecrets[]").get("name"),
                "spec.imagePullSecrets[].name",
            )
            for item in _list(raw.get("imagePullSecrets", []), "spec.imagePullSecrets")
        ),
        resources=_resources(raw.get("resources")),
        log_level=_choice(raw.get("logLevel", "info"), LOG_LEVELS, "spec.logLevel"),
        ui=_ui(raw.get("ui")),
        storage=storage,
        postgresql=postgresql,
        backup=backup,
        upstreams=_upstreams(raw.get("upstreams")),
        ingress=_ingress(raw.get("ingress")),
        peers=peers,
        webhooks=_webhooks(raw.get("notifications")),
        node_proxy=_node_proxy(raw.get("nodeProxy")),
        tls=_serving_tls(raw.get("tls")),
    )


def _serving_tls(raw: Any) -> ServingTls:
    if raw is None:
        return ServingTls()
    data = _mapping(raw, "spec.tls")
    ref = data.get("secretRef")
    mode = _choice(
        data.get("mode", TLS_SECRET if ref is not None else TLS_GENERATED),
        TLS_MODES,
        "spec.tls.mode",
    )
    if mode != TLS_SECRET:
        if ref is not None:
            raise InvalidSpec(
                "spec.tls.secretRef", f"is read with mode {TLS_SECRET} only, not {mode}"
            )
        return ServingTls(mode)
    if ref is None:
        raise InvalidSpec("spec.tls.secretRef", f"is required with mode {TLS_SECRET}")
    name = _str(_mapping(ref, "spec.tls.secretRef").get("name"), "spec.tls.secretRef.name")
    if not _DNS_NAME.match(name) or len(name) > 253:
        raise InvalidSpec("spec.tls.secretRef.name", f"must be a Secret's name, not {name!r}")
    return ServingTls(TLS_SECRET, name)


def _node_proxy(raw: Any) -> NodeProxy:
    if raw is None:
        return NodeProxy()
    data = _mapping(raw, "spec.nodeProxy")
    enabled = _bool(data.get("enabled", True), "spec.nodeProxy.enabled")
    port = data.get("port")
    if port is not None and (
        not isinstance(port, int)
        or isinstance(port, bool)
        or not NODE_PORT_MIN <= port <= NODE_PORT_MAX
    ):
        raise InvalidSpec(
            "spec.nodeProxy.port", f"must be a port from {NODE_PORT_MIN} to {NODE_PORT_MAX}"
        )
    return NodeProxy(enabled=enabled, port=port)


def _webhooks(raw: Any) -> tuple[Webhook, ...]:
    if raw is None:
        return ()
    data = _mapping(raw, "spec.notifications")
    found = []
    for i, item in enumerate(_list(data.get("endpoints", []), "spec.notifications.endpoints")):
        where = f"spec.notifications.endpoints[{i}]"
        entry = _mapping(item, where)
        name = _str(entry.get("name"), f"{where}.name")
        if not _DNS_LABEL.match(name) or len(name) > 40:
            raise InvalidSpec(f"{where}.name", f"{name!r} is not a DNS label of 40 characters")
        url = _http_url(entry.get("url"), f"{where}.url")
        secret = entry.get("headersSecretRef")
        ignored = tuple(
            _choice(a, WEBHOOK_ACTIONS, f"{where}.ignoreActions[]")
            for a in _list(entry.get("ignoreActions", []), f"{where}.ignoreActions")
        )
        found.append(
            Webhook(
                name=name,
                url=url,
                headers_secret=None
                if secret is None
                else _str(
                    _mapping(secret, f"{where}.headersSecretRef").get("name"),
                    f"{where}.headersSecretRef.name",
                ),
                ignore_actions=ignored,
            )
        )
    if len({w.name for w in found}) != len(found):
        raise InvalidSpec("spec.notifications.endpoints", "endpoint names must be unique")
    return tuple(found)


def _peers(raw: Any, namespace: str) -> tuple[Peer, ...]:
    if raw is None:
        return ()
    data = _mapping(raw, "spec.replication")
    peers = []
    for i, item in enumerate(_list(data.get("peers", []), "spec.replication.peers")):
        where = f"spec.replication.peers[{i}]"
        entry = _mapping(item, where)
        name = _str(entry.get("name"), f"{where}.name")
        if not _DNS_LABEL.match(name):
            raise InvalidSpec(f"{where}.name", f"{name!r} is not a DNS label")
        kind = _choice(entry.get("kind", "berth"), PEER_KINDS, f"{where}.kind")
        url, ref = entry.get("url"), entry.get("registryRef")
        if (url is None) == (ref is None):
            raise InvalidSpec(where, "a peer needs exactly one of url or registryRef")
        if ref is not None:
            ref_map = _mapping(ref, f"{where}.registryRef")
            if kind != "berth":
                raise InvalidSpec(f"{where}.kind", "a peer given by registryRef is a Berth peer")
            peers.append(
                Peer(
                    name=name,
                    registry=RegistryRef(
                        name=_label(ref_map.get("name"), f"{where}.registryRef.name"),
                        namespace=_label(
                            ref_map.get("namespace") or namespace, f"{where}.registryRef.namespace"
                        ),
                    ),
                )
            )
            continue
        url = _http_url(url, f"{where}.url")
        secret = _mapping(entry.get("credentialsSecretRef"), f"{where}.credentialsSecretRef")
        peers.append(
            Peer(
                name=name,
                kind=kind,
                url=url.rstrip("/"),
                credentials_secret=_str(secret.get("name"), f"{where}.credentialsSecretRef.name"),
            )
        )
    if len({p.name for p in peers}) != len(peers):
        raise InvalidSpec("spec.replication.peers", "peer names must be unique")
    return tuple(peers)


def _http_url(value: Any, field: str) -> str:
    url = _str(value, field)
    if not url.startswith(("http://", "https://")):
        raise InvalidSpec(field, "must start with http:// or https://")
    return url


def _storage(raw: Mapping[str, Any]) -> Storage:
    kinds = [key for key in ("pvc", "s3", "emptyDir") if key in raw]
    if len(kinds) != 1:
        raise InvalidSpec(
            "spec.storage", "exactly one of storage.pvc, storage.s3 or storage.emptyDir must be set"
        )
    if kinds == ["s3"]:
        return _s3(_mapping(raw["s3"], "spec.storage.s3"))
    if kinds == ["emptyDir"]:
        empty = _mapping(raw["emptyDir"], "spec.storage.emptyDir")
        limit = empty.get("sizeLimit")
        return EmptyDirStorage(
            size_limit=None
            if limit is None
            else _quantity(limit, "spec.storage.emptyDir.sizeLimit")
        )
    pvc = _mapping(raw["pvc"], "spec.storage.pvc")
    modes = tuple(
        _choice(mode, ACCESS_MODES, "spec.storage.pvc.accessModes[]")
        for mode in _list(pvc.get("accessModes", ["ReadWriteOnce"]), "spec.storage.pvc.accessModes")
    )
    if not modes:
        raise InvalidSpec("spec.storage.pvc.accessModes", "must not be empty")
    class_name = pvc.get("storageClassName")
    delete = _bool(
        pvc.get("deleteOnRegistryDelete", False), "spec.storage.pvc.deleteOnRegistryDelete"
    )
    return PvcStorage(
        size=_quantity(pvc.get("size", DEFAULT_PVC_SIZE), "spec.storage.pvc.size"),
        storage_class_name=(
            None if class_name is None else _str(class_name, "spec.storage.pvc.storageClassName")
        ),
        access_modes=modes,
        delete_on_registry_delete=delete,
    )


def _key_ref(raw: Any, field: str, default_key: str) -> KeyRef:
    data = _mapping(raw, field)
    name = _str(data.get("name"), f"{field}.name")
    if not _DNS_NAME.match(name):
        raise InvalidSpec(f"{field}.name", f"{name!r} is not a valid object name")
    key = _str(data.get("key", default_key), f"{field}.key")
    if not _CONFIG_KEY.match(key):
        raise InvalidSpec(f"{field}.key", f"{key!r} is not a valid key")
    return KeyRef(name, key)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidSpec(field, "must be a boolean")
    return value


def _int_between(value: Any, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidSpec(field, f"must be an integer from {low} to {high}")
    return value


def _s3(data: Mapping[str, Any]) -> S3Storage:
    where = "spec.storage.s3"
    bucket = _str(data.get("bucket"), f"{where}.bucket")
    if not _BUCKET.match(bucket):
        raise InvalidSpec(f"{where}.bucket", f"{bucket!r} is not an S3 bucket name")
    endpoint = data.get("endpoint")
    ca = data.get("caConfigMapRef")
    return S3Storage(
        bucket=bucket,
        credentials_secret=_key_ref(
            data.get("credentialsSecretRef"), f"{where}.credentialsSecretRef", S3_ACCESS_KEY
        ).name,
        endpoint="" if endpoint is None else _http_url(endpoint, f"{where}.endpoint").rstrip("/"),
        region=_str(data.get("region", "us-east-1"), f"{where}.region"),
        prefix=_prefix(data.get("prefix")),
        path_style=_bool(data.get("pathStyle", True), f"{where}.pathStyle"),
        redirect=_bool(data.get("redirect", False), f"{where}.redirect"),
        ca=None if ca is None else _key_ref(ca, f"{where}.caConfigMapRef", "ca.crt"),
    )


_UPSTREAM_NUMBERS = (
    ("tagTTLSeconds", "tag_ttl_seconds", 300, 1, 7 * 86400),
    ("timeoutSeconds", "timeout_seconds", 5, 1, 300),
    ("keepLast", "keep_last", 0, 0, 100_000),
    ("maxIdleDays", "max_idle_days", 0, 0, 3650),
)
# A repository path prefix: lowercase components, dots allowed (docker.io, ghcr.io/org).
_UPSTREAM_PREFIX = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*\Z")


def _upstreams(raw: Any) -> tuple[Upstream, ...]:
    found: list[Upstream] = []
    for i, item in enumerate(_list(raw or [], "spec.upstreams")):
        where = f"spec.upstreams[{i}]"
        entry = _mapping(item, where)
        name = _str(entry.get("name"), f"{where}.name")
        if not _DNS_LABEL.match(name) or len(name) > 50:  # it names volumes: upca-<name>
            raise InvalidSpec(f"{where}.name", f"{name!r} is not a DNS label of at most 50")
        prefix = _str(entry.get("prefix"), f"{where}.prefix").strip("/").lower()
        if not _UPSTREAM_PREFIX.match(prefix):
            raise InvalidSpec(f"{where}.prefix", f"{prefix!r} is not a repository path prefix")
        numbers = {
            field: _int_between(entry.get(key, default), f"{where}.{key}", low, high)
            for key, field, default, low, high in _UPSTREAM_NUMBERS
        }
        password, ca = entry.get("passwordSecretRef"), entry.get("caConfigMapRef")
        username = entry.get("username", "")
        credentials = entry.get("credentialsSecretRef")
        if credentials is not None and (password is not None or username):
            raise InvalidSpec(
                f"{where}.credentialsSecretRef", "replaces username and passwordSecretRef"
            )
        if password is not None and not username:
            raise InvalidSpec(f"{where}.username", "is required with passwordSecretRef")
        if ":" in str(username):
            raise InvalidSpec(
                f"{where}.username", "may not contain ':' (HTTP Basic cannot carry it)"
            )
        found.append(
            Upstream(
                name=name,
                url=_http_url(entry.get("url"), f"{where}.url").rstrip("/"),
                prefix=prefix,
                hosts=tuple(h.lower() for h in _strings(entry.get("hosts", []), f"{where}.hosts")),
                username="" if not username else _str(username, f"{where}.username"),
                password=(
                    None
                    if password is None
                    else _key_ref(password, f"{where}.passwordSecretRef", "password")
                ),
                credentials_secret=(
                    None
                    if credentials is None
                    else _str(
                        _mapping(credentials, f"{where}.credentialsSecretRef").get("name"),
                        f"{where}.credentialsSecretRef.name",
                    )
                ),
                ca=None if ca is None else _key_ref(ca, f"{where}.caConfigMapRef", "ca.crt"),
                **numbers,
            )
        )
    for what in ("name", "prefix"):
        if len({getattr(u, what) for u in found}) != len(found):
            raise InvalidSpec("spec.upstreams", f"each upstream's {what} must be unique")
    return tuple(found)


def _backup(raw: Any) -> Backup | None:
    if raw is None:
        return None
    data = _mapping(raw, "spec.backup")
    pvc = _mapping(data.get("pvc", {}), "spec.backup.pvc")
    class_name = pvc.get("storageClassName")
    return Backup(
        interval_hours=_int_between(
            data.get("intervalHours", 24), "spec.backup.intervalHours", 1, 720
        ),
        keep=_int_between(data.get("keep", 7), "spec.backup.keep", 1, 100),
        volume=PvcStorage(
            size=_quantity(pvc.get("size", DEFAULT_PVC_SIZE), "spec.backup.pvc.size"),
            storage_class_name=(
                None if class_name is None else _str(class_name, "spec.backup.pvc.storageClassName")
            ),
        ),
    )


def _prefix(value: Any) -> str:
    if value is None or value == "":
        return ""
    prefix = _str(value, "spec.storage.s3.prefix").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        raise InvalidSpec("spec.storage.s3.prefix", f"{prefix!r} is not a key prefix")
    return prefix


def _postgresql(raw: Any) -> PostgresMetadata | None:
    if raw is None:
        return None
    data = _mapping(raw, "spec.metadata")
    pg = data.get("postgresql")
    if pg is None:
        return None
    where = "spec.metadata.postgresql"
    entry = _mapping(pg, where)
    pool = _int_between(entry.get("poolSize", 10), f"{where}.poolSize", 1, 100)
    return PostgresMetadata(
        connection=_key_ref(
            entry.get("connectionSecretRef"), f"{where}.connectionSecretRef", DEFAULT_DSN_KEY
        ),
        pool_size=pool,
    )


def _ingress(raw: Any) -> Ingress | None:
    if raw is None:
        return None
    data = _mapping(raw, "spec.ingress")
    host = _str(data.get("host"), "spec.ingress.host")
    if not _DNS_NAME.match(host):
        raise InvalidSpec("spec.ingress.host", f"{host!r} is not a DNS name")
    class_name = data.get("className")
    tls_raw = data.get("tls")
    tls = None
    if tls_raw is not None:
        tls_map = _mapping(tls_raw, "spec.ingress.tls")
        tls = Tls(secret_name=_str(tls_map.get("secretName"), "spec.ingress.tls.secretName"))
    annotations = _mapping(data.get("annotations", {}), "spec.ingress.annotations")
    proxies = data.get("trustedProxies")
    return Ingress(
        host=host,
        class_name=None if class_name is None else _str(class_name, "spec.ingress.className"),
        tls=tls,
        annotations={
            _str(k, "spec.ingress.annotations"): _str(v, f"spec.ingress.annotations.{k}")
            for k, v in sorted(annotations.items())
        },
        trusted_proxies=(
            DEFAULT_TRUSTED_PROXIES if proxies is None else _networks(proxies, "spec.ingress")
        ),
    )


def _networks(value: Any, field: str) -> tuple[str, ...]:
    """Addresses or CIDR networks, as the server's http.trusted_proxies takes them."""
    networks = _strings(value, f"{field}.trustedProxies")
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise InvalidSpec(
                f"{field}.trustedProxies[]", f"{network[:60]!r} is not an IP address or network"
            ) from None
    return networks


def _resources(raw: Any) -> Mapping[str, Mapping[str, str]]:
    if raw is None:
        return DEFAULT_RESOURCES
    data = _mapping(raw, "spec.resources")
    result: dict[str, dict[str, str]] = {}
    for section in ("requests", "limits"):
        values = _mapping(data.get(section, {}), f"spec.resources.{section}")
        if values:
            result[section] = {
                str(name): _quantity(value, f"spec.resources.{section}.{name}")
                for name, value in sorted(values.items())
            }
    return result


def _ui(raw: Any) -> bool:
    if raw is None:
        return True
    enabled = _mapping(raw, "spec.ui").get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidSpec("spec.ui.enabled", "must be true or false")
    return enabled


def _quantity(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidSpec(field, "must be a quantity such as 10Gi or 500m")
    text = str(value)
    if not _QUANTITY.match(text):
        raise InvalidSpec(field, f"{text!r} is not a quantity such as 10Gi or 500m")
    return text


def _choice(value: Any, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        raise InvalidSpec(field, f"must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSpec(field, "must be a non-empty string")
    return value


def is_object_name(text: str) -> bool:
    """Whether ``text`` can name a Kubernetes object (a DNS subdomain)."""
    return len(text) <= 253 and _DNS_NAME.match(text) is not None


def _label(value: Any, field: str) -> str:
    """An object name that must be a DNS label (a Registry's, a namespace's)."""
    text = _str(value, field)
    if len(text) > 63 or not _DNS_LABEL.match(text):
        raise InvalidSpec(field, f"{text[:80]!r} is not a name (a DNS label)")
    return text


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpec(field, "must be an object")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidSpec(field, "must be a list")
    return list(value)


# --- Repository --------------------------------------------------------------------------

VISIBILITIES = ("private", "public")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# The OCI distribution-spec repository name grammar (the CRD checks it too).
# A repository name (the OCI grammar), or a pattern of them: components that are names,
# or hold the server's wildcards (`*` within a component, `**` across, `?` one
# character). Kept equal to the CRD's `spec.path` pattern.
_PATH_COMPONENT = r"([a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*|[a-z0-9._-]*[*?][a-z0-9._*?-]*)"
_REPOSITORY_PATH = re.compile(rf"^{_PATH_COMPONENT}(/{_PATH_COMPONENT})*\Z")
_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?[hms])+\Z")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: Any, field: str) -> float:
    """Seconds from a duration such as 720h, 1h30m or 45s (Go's format, h/m/s only)."""
    text = _str(value, field)
    if not _DURATION.match(text):
        raise InvalidSpec(field, f"{text!r} is not a duration such as 720h, 10m or 45s")
    return sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn


@dataclasses.dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector; like Kubernetes, an empty one matches everything."""

    match_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.expressions
        )


@dataclasses.dataclass(frozen=True)
class Access:
    """Namespaces granted pull (or push), the Secret name and the ServiceAccounts."""

    namespaces: tuple[str, ...] = ()
    selector: Selector | None = None
    service_accounts: tuple[str, ...] = ()
    secret_name: str | None = None

    def covers(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace in self.namespaces:
            return True
        return self.selector is not None and self.selector.matches(labels)


@dataclasses.dataclass(frozen=True)
class Retention:
    keep_last: int | None = None
    protect: tuple[str, ...] = ()
    untagged_days: int | None = None  # manifests nothing has held this long go


# The server's bound on retention.untagged_days (a century).
MAX_UNTAGGED_DAYS = 36500


@dataclasses.dataclass(frozen=True)
class Quota:
    """Limits the server holds pushes to (docs/usage-and-quotas.md); None: no limit."""

    storage: int | None = None  # bytes
    tags: int | None = None


# A size the server's policy accepts: whole numbers with a binary or decimal suffix.
_SIZE = re.compile(r"^([0-9]{1,19})(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?\Z")
_SIZE_FACTORS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


def parse_size(value: Any, field: str) -> int:
    """Bytes from a quantity such as 10Gi or 500M (or a plain number of bytes)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidSpec(field, "must be a size such as 10Gi, 500Mi or 2000000000")
    found = _SIZE.match(str(value))
    if not found:
        raise InvalidSpec(field, f"{str(value)[:40]!r} is not a size such as 10Gi or 500Mi")
    return int(found.group(1)) * _SIZE_FACTORS[found.group(2)]


def _quota(raw: Any) -> Quota | None:
    if raw is None:
        return None
    data = _mapping(raw, "spec.quota")
    storage = (
        None if data.get("storage") is None else parse_size(data["storage"], "spec.quota.storage")
    )
    tags = data.get("tags")
    if tags is not None and (not isinstance(tags, int) or isinstance(tags, bool) or tags < 0):
        raise InvalidSpec("spec.quota.tags", "must be a number of tags, 0 or more")
    if storage is None and tags is None:
        return None
    return Quota(storage, tags)


@dataclasses.dataclass(frozen=True)
class Rotation:
    interval: float | None = None  # seconds between automatic rotations; None = never
    overlap: float = DEFAULT_ROTATION_OVERLAP  # how long the old credential stays valid


@dataclasses.dataclass(frozen=True)
class Repository:
    owner: Owner
    generation: int
    created: str  # metadata.creationTimestamp: the older of two claims keeps a path
    registry: str
    path: str
    visibility: str = "private"
    pull: Access | None = None
    push: Access | None = None  # the Repository's own namespace is always granted push
    retention: Retention | None = None
    immutable_tags: tuple[str, ...] = ()
    rotation: Rotation = dataclasses.field(default_factory=Rotation)
    rotate_request: str | None = None  # the berth.dev/rotate annotation
    quota: Quota | None = None

    @property
    def age_key(self) -> tuple[str, str]:
        """Orders claims of one path: the older wins, the name breaks a tie."""
        return (self.created, self.owner.name)


def parse_repository(body: Mapping[str, Any]) -> Repository:
    meta = _mapping(body.get("metadata"), "metadata")
    owner = Owner(
        name=_str(meta.get("name"), "metadata.name"),
        namespace=_str(meta.get("namespace"), "metadata.namespace"),
        uid=_str(meta.get("uid", ""), "metadata.uid"),
        kind=REPOSITORY_KIND,
    )
    raw = _mapping(body.get("spec", {}), "spec")
    ref = _mapping(raw.get("registryRef"), "spec.registryRef")
    path = _str(raw.get("path"), "spec.path")
    if len(path) > 255 or not _REPOSITORY_PATH.match(path):
        raise InvalidSpec(
            "spec.path", f"{path!r} is not an OCI repository name or a pattern of them"
        )
    retention = None
    if raw.get("retention") is not None:
        data = _mapping(raw["retention"], "spec.retention")
        keep = data.get("keepLast")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise InvalidSpec("spec.retention.keepLast", "must be a positive integer")
        untagged = data.get("untaggedDays")
        if untagged is not None and (
            not isinstance(untagged, int)
            or isinstance(untagged, bool)
            or not 1 <= untagged <= MAX_UNTAGGED_DAYS
        ):
            raise InvalidSpec(
                "spec.retention.untaggedDays",
                f"must be a whole number of days, 1 to {MAX_UNTAGGED_DAYS}",
            )
        retention = Retention(
            keep_last=keep,
            protect=_tag_patterns(data.get("protect", []), "spec.retention.protect"),
            untagged_days=untagged,
        )
    rotation = Rotation()
    if raw.get("rotation") is not None:
        data = _mapping(raw["rotation"], "spec.rotation")
        rotation = Rotation(
            interval=None
            if data.get("interval") is None
            else parse_duration(data["interval"], "spec.rotation.interval"),
            overlap=DEFAULT_ROTATION_OVERLAP
            if data.get("overlap") is None
            else parse_duration(data["overlap"], "spec.rotation.overlap"),
        )
        # Every rotation rewrites the pull Secrets of the namespaces the robot serves,
        # other Repositories' too: "0s" rotated twice a second (found by review). The
        # CRD refuses less than an hour; one stored before it did is read as an hour
        # (refused here, the Repository's grants would all be revoked).
        if rotation.interval is not None and rotation.interval < MIN_ROTATION_INTERVAL:
            rotation = dataclasses.replace(rotation, interval=MIN_ROTATION_INTERVAL)
    annotations = _mapping(meta.get("annotations") or {}, "metadata.annotations")
    request = annotations.get(ROTATE_ANNOTATION)
    return Repository(
        owner=owner,
        generation=int(meta.get("generation", 0)),
        created=str(meta.get("creationTimestamp", "")),
        registry=_label(ref.get("name"), "spec.registryRef.name"),
        path=path,
        visibility=_choice(raw.get("visibility", "private"), VISIBILITIES, "spec.visibility"),
        pull=_access(raw.get("pullAccess"), "spec.pullAccess"),
        push=_access(raw.get("pushAccess"), "spec.pushAccess"),
        retention=retention,
        immutable_tags=_tag_patterns(raw.get("immutableTags", []), "spec.immutableTags"),
        rotation=rotation,
        rotate_request=None if request is None else str(request),
        quota=_quota(raw.get("quota")),
    )


def _access(raw: Any, field: str) -> Access | None:
    if raw is None:
        return None
    data = _mapping(raw, field)
    namespaces = _strings(data.get("namespaces", []), f"{field}.namespaces")
    for namespace in namespaces:
        if not _DNS_LABEL.match(namespace):
            raise InvalidSpec(f"{field}.namespaces", f"{namespace!r} is not a namespace name")
    selector = None
    if data.get("namespaceSelector") is not None:
        selector = _selector(data["namespaceSelector"], f"{field}.namespaceSelector")
    secret_name = data.get("secretName")
    if secret_name is not None and not _DNS_NAME.match(_str(secret_name, f"{field}.secretName")):
        raise InvalidSpec(f"{field}.secretName", f"{secret_name!r} cannot name a Secret")
    accounts = _strings(data.get("serviceAccounts", []), f"{field}.serviceAccounts")
    for account in accounts:
        if not is_object_name(account):
            raise InvalidSpec(
                f"{field}.serviceAccounts", f"{account[:80]!r} is not a ServiceAccount name"
            )
    return Access(
        namespaces=tuple(sorted(set(namespaces))),
        selector=selector,
        service_accounts=tuple(sorted(set(accounts))),
        secret_name=secret_name,
    )


def _selector(raw: Any, field: str) -> Selector:
    data = _mapping(raw, field)
    labels = _mapping(data.get("matchLabels") or {}, f"{field}.matchLabels")
    expressions = []
    for i, item in enumerate(_list(data.get("matchExpressions", []), f"{field}.matchExpressions")):
        where = f"{field}.matchExpressions[{i}]"
        entry = _mapping(item, where)
        operator = _choice(entry.get("operator"), SELECTOR_OPERATORS, f"{where}.operator")
        values = _strings(entry.get("values", []), f"{where}.values")
        if operator in ("In", "NotIn") and not values:
            raise InvalidSpec(f"{where}.values", f"must not be empty for {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise InvalidSpec(f"{where}.values", f"must be empty for {operator}")
        expressions.append(
            Requirement(_str(entry.get("key"), f"{where}.key"), operator, tuple(values))
        )
    return Selector(
        match_labels={_str(k, f"{field}.matchLabels"): str(v) for k, v in sorted(labels.items())},
        expressions=tuple(expressions),
    )


# The registry server's tag pattern grammar (docs/auth.md): one pattern it would refuse
# would make it refuse the whole policy file, so such a spec is invalid here already.
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.*?-]{1,128}")


def _tag_patterns(value: Any, field: str) -> tuple[str, ...]:
    patterns = _strings(value, field)
    for pattern in patterns:
        if not _TAG_PATTERN.fullmatch(pattern):
            raise InvalidSpec(
                f"{field}[]", f"{pattern[:140]!r} is not a tag pattern (tag characters, * and ?)"
            )
    return patterns


def _strings(value: Any, field: str) -> tuple[str, ...]:
    return tuple(_str(item, f"{field}[]") for item in _list(value, field))
