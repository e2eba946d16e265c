"""Typed, frozen server settings: a YAML file, then environment overrides."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from registry_server.protocol import versions


class ConfigError(Exception):
    """The configuration is invalid; the message says which key and why."""


# The headers a trusted proxy may name the client in (http.forwarded_header).
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")

# http.tls.client_auth: what a client without a certificate the client CA signed gets.
CLIENT_AUTH_MODES = ("require", "optional")
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS on ``http.addr`` (the metrics listener stays plain HTTP)."""

    # PEM files, typically a mounted Secret's tls.crt and tls.key: re-read when they
    # change, a bad new pair is refused and the last good one kept.
    certificate: Path = Path()
    key: Path = Path()
    # Mutual TLS: clients must (require) or may (optional) show a certificate it signed.
    client_ca: Path | None = None
    client_auth: str = "require"
    min_version: str = "1.2"
    reload_interval_seconds: float = 1.0


@dataclass(frozen=True)
class HttpConfig:
    addr: str = "127.0.0.1:5000"
    external_url: str = ""
    workers: int = 1
    # host:port of a listener serving only /metrics; empty: /metrics on `addr` instead.
    metrics_addr: str = ""
    # Peers (addresses or CIDR networks) whose forwarded-for header names the client;
    # from anyone else the header is ignored, so no client can choose its own address.
    trusted_proxies: tuple[str, ...] = ()
    forwarded_header: str = "x-forwarded-for"  # or "forwarded" (RFC 7239)
    tls: TlsConfig | None = None  # None: plain HTTP
    # host:port values clients use through a plain-HTTP relay in front of this TLS
    # listener (the node proxy's localhost:<port>): their token realm says http://.
    relayed_hosts: tuple[str, ...] = ()
    # After SIGTERM: seconds of serving on, with /readyz saying 503, before the graceful
    # shutdown, so that a Service stops sending new connections first (0: at once).
    drain_seconds: float = 0.0
    # A request body (a blob's chunk, a manifest) that sends nothing for this long is
    # refused: a client gone silent would hold its upload session and a descriptor.
    body_idle_timeout_seconds: float = 60.0

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    @property
    def metrics_host(self) -> str:
        return self.metrics_addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_addr.rsplit(":", 1)[1])


STORAGE_DRIVERS = ("filesystem", "s3")
_MIN_PART = 5 << 20  # S3's smallest multipart part
_MAX_PART = 5 << 30  # and its largest


@dataclass(frozen=True)
class S3Config:
    """Blobs in an S3-compatible object store (``storage.driver: s3``)."""

    bucket: str = ""
    endpoint: str = ""  # empty: AWS's own endpoint for the region
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket, so that stores can share one
    # Inline keys, or files holding them (a mounted Secret); with neither, botocore's own
    # chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity, instance profile).
    access_key: str = ""
    secret_key: str = ""
    access_key_file: Path | None = None
    secret_key_file: Path | None = None
    ca_file: Path | None = None
    tls_verify: bool = True
    path_style: bool = True  # endpoint/bucket/key URLs; false: virtual-hosted where AWS says
    redirect: bool = False  # blob GET answers 307 to a pre-signed URL of the object
    redirect_expiry_seconds: int = 1200
    part_size: int = 8 << 20  # upload segment size: the memory one upload holds at most

    def credentials(self) -> tuple[str, str]:
        """(access key, secret key); empty strings leave the choice to botocore."""
        try:
            access = self.access_key_file.read_text().strip() if self.access_key_file else ""
            secret = self.secret_key_file.read_text().strip() if self.secret_key_file else ""
        except OSError as exc:
            raise ConfigError(f"storage.s3: cannot read a key file: {exc}") from None
        return self.access_key or access, self.secret_key or secret


@dataclass(frozen=True)
class StorageConfig:
    root: Path = Path("./data")  # the filesystem driver's blobs, and the SQLite index
    index: str = "sqlite"
    driver: str = "filesystem"  # one of STORAGE_DRIVERS
    s3: S3Config | None = None
    # Pushes are refused (507) while the volume holding root has less free than this.
    min_free_bytes: int = 64 << 20
    # Preallocated on that volume (root/space-reserve) and released so that deletes and
    # collection commit to the SQLite index when the volume is full; 0: none.
    reserve_bytes: int = 8 << 20


# The metadata index backends (metadata.driver).
METADATA_DRIVERS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class PostgresConfig:
    """The PostgreSQL metadata index (``metadata.driver: postgresql``)."""

    dsn: str = ""  # a libpq connection string (URI or key=value)
    dsn_file: Path | None = None  # or a file holding it: a mounted Secret, preferred
    pool_size: int = 10  # connections per worker process

    def connection_string(self) -> str:
        if self.dsn_file is None:
            return self.dsn
        try:
            text = self.dsn_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"metadata.postgresql.dsn_file: cannot read it: {exc}") from None
        if not text:
            raise ConfigError(f"metadata.postgresql.dsn_file: {self.dsn_file} is empty")
        return text


@dataclass(frozen=True)
class MetadataConfig:
    driver: str = "sqlite"  # sqlite: <storage.root>/index.db, one pod only
    postgresql: PostgresConfig | None = None
    # How this replica is named to the others (election, pg_stat_activity, logs); empty:
    # the host name, which in Kubernetes is the pod's name.
    replica_id: str = ""

    def replica(self) -> str:
        return self.replica_id or socket.gethostname()


@dataclass(frozen=True)
class LimitsConfig:
    max_manifest_bytes: int = 4 * 1024 * 1024
    upload_purge_after_seconds: int = 24 * 3600


@dataclass(frozen=True)
class GcConfig:
    interval_seconds: int = 3600  # 0 disables the background collector
    grace_seconds: int = 3600  # unreferenced blobs younger than this are kept


@dataclass(frozen=True)
class BackupConfig:
    """Scheduled online backups of a filesystem registry with its SQLite index
    (``backup``, an elected task): snapshots in ``dir``, blobs hard-linked between them."""

    interval_seconds: int = 0  # 0: no scheduled backups (`berth-registry backup` by hand)
    dir: Path = Path("./backups")  # a volume of its own, not inside storage.root
    keep: int = 7  # complete snapshots kept; older ones are removed after a new one


@dataclass(frozen=True)
class AuthConfig:
    service: str = "berth"
    issuer: str = "berth"
    htpasswd: Path | None = None
    policy: Path | None = None
    signing_key: Path | None = None
    token_ttl_seconds: int = 300
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    reload_interval_seconds: int = 1
    credential_cache_seconds: int = 60
    failure_limit: int = 10  # per account and client
    failure_window_seconds: int = 60
    client_failure_limit: int = 100  # per client, whatever the accounts


@dataclass(frozen=True)
class PeerConfig:
    """Another registry this instance replicates to."""

    name: str
    url: str
    kind: str = "berth"  # "berth" (two-way, versioned) or "oci" (any registry, one-way push)
    username: str = ""
    username_file: Path | None = None  # preferred over username (a mounted Secret's key)
    password: str = ""
    password_file: Path | None = None  # preferred over an inline password (mounted Secret)
    # Where else than the peer's own origin its Bearer challenge may send our credentials
    # (a registry whose token service lives elsewhere): one realm URL, "" for none.
    token_realm: str = ""
    ca_file: Path | None = None
    tls_verify: bool = True
    concurrency: int = 4
    bandwidth_limit_mbps: float = 0.0  # 0: unlimited
    chunk_size_mb: int = 32

    def user(self) -> str:
        """The account; from its file at every use, like the password."""
        if self.username_file is not None:
            return self.username_file.read_text().strip()
        return self.username

    def secret(self) -> str:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password


@dataclass(frozen=True)
class UpstreamConfig:
    """A registry mirrored on demand: a pull-through cache (docs/pull-through-cache.md)."""

    name: str
    url: str
    prefix: str  # local "<prefix>/x" mirrors the upstream's "x", e.g. docker.io
    # containerd's ?ns= values selecting this upstream; empty: the prefix and the URL's host.
    hosts: tuple[str, ...] = ()
    # Single-component names map to library/<name> (Docker Hub); None: only for docker.io.
    docker_library: bool | None = None
    username: str = ""
    username_file: Path | None = None
    password: str = ""
    password_file: Path | None = None
    token_realm: str = ""  # where else its Bearer challenge may send the credentials
    ca_file: Path | None = None
    tls_verify: bool = True
    tag_ttl_seconds: float = 300.0  # a cached tag is revalidated (HEAD) after this
    timeout_seconds: float = 5.0  # bound on asking the upstream when a cached copy exists
    keep_last: int = 0  # eviction: tags kept per repository, most recently pulled (0: all)
    max_idle_days: float = 0.0  # eviction: tags not pulled for this long go (0: never)

    def as_peer(self) -> PeerConfig:
        """The client settings: upstreams are reached like one-way replication peers."""
        return PeerConfig(
            name=self.name,
            url=self.url,
            kind="oci",
            username=self.username,
            username_file=self.username_file,
            password=self.password,
            password_file=self.password_file,
            token_realm=self.token_realm,
            ca_file=self.ca_file,
            tls_verify=self.tls_verify,
        )


@dataclass(frozen=True)
class ReplicationConfig:
    region: str = ""
    peers: tuple[PeerConfig, ...] = ()
    anti_entropy_interval_seconds: float = 60.0
    tombstone_ttl_seconds: float = 7 * 24 * 3600
    retry_max_seconds: float = 30.0


@dataclass(frozen=True)
class EndpointConfig:
    """A webhook receiving event envelopes (docs/notifications.md)."""

    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()  # e.g. Authorization for the receiver
    # More headers, one file each (file name: header name), read at every delivery: a
    # mounted Secret, so a rotated token is used without a restart.
    headers_dir: Path | None = None
    timeout_seconds: float = 5.0
    retry_max_seconds: float = 60.0  # backoff ceiling; delivery retries until it succeeds
    batch: int = 32  # events per request at most
    ignore_actions: tuple[str, ...] = ()  # "push", "delete"
    ignore_media_types: tuple[str, ...] = ()
    ca_file: Path | None = None
    tls_verify: bool = True


@dataclass(frozen=True)
class NotificationsConfig:
    endpoints: tuple[EndpointConfig, ...] = ()


@dataclass(frozen=True)
class UiConfig:
    # The web UI at /ui/ (docs/ui.md): on unless turned off.
    enabled: bool = True


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    gc: GcConfig = field(default_factory=GcConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    auth: AuthConfig | None = None
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    ui: UiConfig = field(default_factory=UiConfig)
    log: LogConfig = field(default_factory=LogConfig)


_ENV: dict[str, tuple[str, str, type]] = {
    "BERTH_HTTP_ADDR": ("http", "addr", str),
    "BERTH_EXTERNAL_URL": ("http", "external_url", str),
    "BERTH_WORKERS": ("http", "workers", int),
    "BERTH_METRICS_ADDR": ("http", "metrics_addr", str),
    "BERTH_STORAGE_ROOT": ("storage", "root", Path),
    "BERTH_MAX_MANIFEST_BYTES": ("limits", "max_manifest_bytes", int),
    "BERTH_LOG_LEVEL": ("log", "level", str),
    "BERTH_LOG_FORMAT": ("log", "format", str),
    "BERTH_REGION": ("replication", "region", str),
    "BERTH_METADATA_DRIVER": ("metadata", "driver", str),
    "BERTH_REPLICA_ID": ("metadata", "replica_id", str),
}

_SECTIONS: dict[str, type] = {
    "http": HttpConfig,
    "storage": StorageConfig,
    "limits": LimitsConfig,
    "gc": GcConfig,
    "backup": BackupConfig,
    "auth": AuthConfig,
    "ui": UiConfig,
    "log": LogConfig,
}


def _integer(value: Any, where: str) -> int:
    """An integer, or its decimal text; never a bool or a float cut short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}") from None
    else:
        raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
    return number


_N = TypeVar("_N", int, float)


def _bounded(
    value: _N,
    where: str,
    *,
    at_least: _N | None = None,
    above: _N | None = None,
    at_most: _N | None = None,
) -> _N:
    """`value`, checked against its bounds (inclusive `at_least`, exclusive `above`,
    inclusive `at_most`); out of them, a ConfigError naming `where` and the bounds."""
    low_ok = (at_least is None or value >= at_least) and (above is None or value > above)
    if low_ok and (at_most is None or value <= at_most):
        return value
    if at_least is not None and at_most is not None:
        wanted = f"must be between {at_least} and {at_most}"
    elif above is not None and at_most is not None:
        wanted = f"must be above {above} and at most {at_most}"
    elif at_least is not None:
        wanted = "must not be negative" if at_least == 0 else f"must be at least {at_least}"
    elif above is not None:
        wanted = "must be positive" if above == 0 else f"must be above {above}"
    else:
        wanted = f"must be at most {at_most}"
    raise ConfigError(f"{where} {wanted}, got {_shown(value)}")


def _flag(value: Any, where: str) -> bool:
    # bool("false") is True: only YAML's own true/false are taken.
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{name}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        current = getattr(defaults, key)
        if value is None:
            values[key] = None
        elif isinstance(current, Path) or (
            current is None and key in ("htpasswd", "policy", "signing_key")
        ):
            values[key] = Path(str(value))
        elif isinstance(current, tuple):
            values[key] = _strings(value, f"{name}.{key}")
        elif isinstance(current, bool):
            values[key] = _flag(value, f"{name}.{key}")
        elif not isinstance(current, int):
            values[key] = value if not isinstance(current, str) else str(value)
        else:
            values[key] = _integer(value, f"{name}.{key}")
    return cls(**values)


def _remote(raw: Any, where: str, cls: type) -> dict[str, Any]:
    """A peer or webhook entry: a mapping of ``cls``'s keys with a name and an http(s) url."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("name", "url"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key} is required")
    if not raw["url"].startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url must start with http:// or https://")
    if ":" in str(raw.get("username") or ""):
        raise ConfigError(f"{where}.username may not contain ':' (HTTP Basic cannot carry it)")
    return raw


def _peer(index: int, raw: Any) -> PeerConfig:
    where = f"replication.peers[{index}]"
    raw = _remote(raw, where, PeerConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("username_file", "password_file", "ca_file"):
            values[key] = Path(str(value)) if value else None
        elif key == "tls_verify":
            values[key] = _flag(value, f"{where}.{key}")
        elif key in ("concurrency", "chunk_size_mb"):
            values[key] = _integer(value, f"{where}.{key}")
        elif key == "bandwidth_limit_mbps":
            values[key] = _number(value, f"{where}.{key}")
        else:
            values[key] = str(value)
    peer = PeerConfig(**values)
    if peer.kind not in ("berth", "oci"):
        raise ConfigError(f"{where}.kind must be 'berth' or 'oci', got {peer.kind!r}")
    _bounded(peer.concurrency, f"{where}.concurrency", at_least=1)
    _bounded(peer.chunk_size_mb, f"{where}.chunk_size_mb", at_least=1)
    if peer.token_realm:
        if not peer.token_realm.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.token_realm must start with http:// or https://")
        if peer.url.startswith("https://") and not peer.token_realm.startswith("https://"):
            # The password would travel in clear to reach a peer we only talk TLS to.
            raise ConfigError(f"{where}.token_realm must be https:// for an https:// peer")
    return peer


def _upstream(index: int, raw: Any) -> UpstreamConfig:
    where = f"upstreams[{index}]"
    raw = _remote(raw, where, UpstreamConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("username_file", "password_file", "ca_file"):
            values[key] = Path(str(value)) if value else None
        elif key in ("tls_verify", "docker_library"):
            values[key] = None if value is None else _flag(value, f"{where}.{key}")
        elif key == "keep_last":
            values[key] = _integer(value, f"{where}.{key}")
        elif key in ("tag_ttl_seconds", "timeout_seconds", "max_idle_days"):
            values[key] = _number(value, f"{where}.{key}")
        elif key == "hosts":
            values[key] = tuple(h.lower() for h in _strings(value, f"{where}.hosts"))
        else:
            values[key] = str(value)
    if not isinstance(values.get("prefix"), str) or not values["prefix"].strip("/"):
        raise ConfigError(f"{where}.prefix is required (e.g. docker.io)")
    values["prefix"] = values["prefix"].strip("/")
    upstream = UpstreamConfig(**values)
    _bounded(upstream.tag_ttl_seconds, f"{where}.tag_ttl_seconds", at_least=0)
    _bounded(upstream.timeout_seconds, f"{where}.timeout_seconds", above=0)
    _bounded(upstream.keep_last, f"{where}.keep_last", at_least=0)
    _bounded(upstream.max_idle_days, f"{where}.max_idle_days", at_least=0)
    if upstream.token_realm and not upstream.token_realm.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.token_realm must start with http:// or https://")
    return upstream


def _upstreams(raw: Any) -> tuple[UpstreamConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError("upstreams: expected a list")
    upstreams = tuple(_upstream(i, u) for i, u in enumerate(raw))
    for what in ("name", "prefix"):
        values = [getattr(u, what) for u in upstreams]
        if len(set(values)) != len(values):
            raise ConfigError(f"upstreams: each {what} must be unique")
    return upstreams


def _http(raw: Any) -> HttpConfig:
    if not isinstance(raw, dict):
        raise ConfigError("http: expected a mapping")
    base: HttpConfig = _section("http", HttpConfig, {k: v for k, v in raw.items() if k != "tls"})
    if raw.get("tls") is None:
        return base
    return replace(base, tls=_tls(raw["tls"]))


def _tls(raw: Any) -> TlsConfig:
    if not isinstance(raw, dict):
        raise ConfigError("http.tls: expected a mapping")
    unknown = set(raw) - {f.name for f in dataclasses.fields(TlsConfig)}
    if unknown:
        raise ConfigError(f"http.tls: unknown keys {sorted(unknown)}")
    for key in ("certificate", "key"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"http.tls.{key} is required (a PEM file)")
    client_ca = raw.get("client_ca")
    if client_ca is not None and not isinstance(client_ca, str):
        raise ConfigError(f"http.tls.client_ca: expected a path, got {_shown(client_ca)}")
    return TlsConfig(
        certificate=Path(raw["certificate"]),
        key=Path(raw["key"]),
        client_ca=Path(client_ca) if client_ca else None,
        client_auth=str(raw.get("client_auth", "require")),
        min_version=str(raw.get("min_version", "1.2")),
        reload_interval_seconds=_number(
            raw.get("reload_interval_seconds", 1.0), "http.tls.reload_interval_seconds"
        ),
    )


def _validate_tls(tls: TlsConfig) -> None:
    if tls.client_auth not in CLIENT_AUTH_MODES:
        raise ConfigError(
            f"http.tls.client_auth: expected one of {', '.join(CLIENT_AUTH_MODES)},"
            f" got {_shown(tls.client_auth)}"
        )
    if tls.min_version not in TLS_VERSIONS:
        raise ConfigError(
            f"http.tls.min_version: expected one of {', '.join(TLS_VERSIONS)},"
            f" got {_shown(tls.min_version)}"
        )
    _bounded(tls.reload_interval_seconds, "http.tls.reload_interval_seconds", above=0, at_most=3600)
    for name, path in (
        ("certificate", tls.certificate),
        ("key", tls.key),
        ("client_ca", tls.client_ca),
    ):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"http.tls.{name}: cannot read {path}")


def _storage(raw: Any) -> StorageConfig:
    if not isinstance(raw, dict):
        raise ConfigError("storage: expected a mapping")
    base: StorageConfig = _section(
        "storage", StorageConfig, {k: v for k, v in raw.items() if k != "s3"}
    )
    if raw.get("s3") is None:
        return base
    return replace(base, s3=_s3(raw["s3"]))


def _s3(raw: Any) -> S3Config:
    if not isinstance(raw, dict):
        raise ConfigError("storage.s3: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(S3Config)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"storage.s3: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"storage.s3.{key}"
        default = getattr(S3Config(), key)
        if value is None:
            continue
        if isinstance(default, bool):
            values[key] = _flag(value, where)
        elif isinstance(default, int):
            values[key] = _integer(value, where)
        elif key.endswith("_file"):
            values[key] = Path(str(value)) if value else None
        elif isinstance(value, str):
            values[key] = value
        else:
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
    return S3Config(**values)


def _validate_storage(storage: StorageConfig) -> None:
    _bounded(storage.min_free_bytes, "storage.min_free_bytes", at_least=0)
    _bounded(storage.reserve_bytes, "storage.reserve_bytes", at_least=0)
    if storage.index != "sqlite":
        raise ConfigError(f"storage.index: unknown index backend {storage.index!r}")
    if storage.driver not in STORAGE_DRIVERS:
        raise ConfigError(
            f"storage.driver: unknown storage driver {_shown(storage.driver)}; "
            f"expected one of {', '.join(STORAGE_DRIVERS)}"
        )
    s3 = storage.s3
    if storage.driver != "s3":
        if s3 is not None:
            raise ConfigError(f"storage.s3 is set but storage.driver is {storage.driver!r}")
        return
    if s3 is None or not s3.bucket:
        raise ConfigError("storage.s3.bucket is required when storage.driver is s3")
    if s3.endpoint and not s3.endpoint.startswith(("http://", "https://")):
        raise ConfigError("storage.s3.endpoint must start with http:// or https://")
    _bounded(s3.part_size, "storage.s3.part_size", at_least=_MIN_PART, at_most=_MAX_PART)
    _bounded(  # SigV4's limit: seven days
        s3.redirect_expiry_seconds,
        "storage.s3.redirect_expiry_seconds",
        at_least=1,
        at_most=7 * 24 * 3600,
    )
    if bool(s3.access_key) != bool(s3.secret_key) or bool(s3.access_key_file) != bool(
        s3.secret_key_file
    ):
        raise ConfigError("storage.s3: give access and secret key together (inline or as files)")
    s3.credentials()  # unreadable key files stop the start-up here, naming the key


def _replication(raw: Any) -> ReplicationConfig:
    if not isinstance(raw, dict):
        raise ConfigError("replication: expected a mapping")
    known = {f.name for f in dataclasses.fields(ReplicationConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"replication: unknown keys {sorted(unknown)}")
    peers_raw = raw.get("peers") or []
    if not isinstance(peers_raw, list):
        raise ConfigError("replication.peers: expected a list")
    peers = tuple(_peer(i, p) for i, p in enumerate(peers_raw))
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ConfigError("replication.peers: peer names must be unique")
    defaults = ReplicationConfig()

    def number(key: str) -> float:
        value = raw.get(key, getattr(defaults, key))
        return _number(value, f"replication.{key}")

    return ReplicationConfig(
        region=str(raw.get("region") or ""),
        peers=peers,
        anti_entropy_interval_seconds=number("anti_entropy_interval_seconds"),
        tombstone_ttl_seconds=number("tombstone_ttl_seconds"),
        retry_max_seconds=number("retry_max_seconds"),
    )


def _metadata(raw: Any) -> MetadataConfig:
    if not isinstance(raw, dict):
        raise ConfigError("metadata: expected a mapping")
    unknown = set(raw) - {"driver", "postgresql", "replica_id"}
    if unknown:
        raise ConfigError(f"metadata: unknown keys {sorted(unknown)}")
    driver = raw.get("driver", "sqlite")
    if not isinstance(driver, str):
        raise ConfigError(
            f"metadata.driver: expected one of {', '.join(METADATA_DRIVERS)}, got {_shown(driver)}"
        )
    replica_id = raw.get("replica_id") or ""
    if not isinstance(replica_id, str):
        raise ConfigError(f"metadata.replica_id: expected a string, got {_shown(replica_id)}")
    pg = raw.get("postgresql")
    if pg is None:
        return MetadataConfig(driver, None, replica_id)
    where = "metadata.postgresql"
    if not isinstance(pg, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(pg) - {f.name for f in dataclasses.fields(PostgresConfig)}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    dsn = pg.get("dsn") or ""
    if not isinstance(dsn, str):
        raise ConfigError(f"{where}.dsn: expected a string")
    return MetadataConfig(
        driver,
        PostgresConfig(
            dsn=dsn,
            dsn_file=Path(str(pg["dsn_file"])) if pg.get("dsn_file") else None,
            pool_size=_integer(pg.get("pool_size", 10), f"{where}.pool_size"),
        ),
        replica_id,
    )


_ACTIONS = ("push", "delete")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_header(name: str, value: str) -> None:
    """A header name is an HTTP token; a value has no control characters (no CR/LF)."""
    if not _TOKEN.fullmatch(name) or any(
        (ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value
    ):
        raise ValueError(f"invalid header {name[:60]!r}: a token name, no control characters")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def _endpoint(index: int, raw: Any) -> EndpointConfig:
    where = f"notifications.endpoints[{index}]"
    raw = _remote(raw, where, EndpointConfig)
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers: expected a mapping of strings")
    for header, value in headers.items():
        try:
            check_header(header, value)
        except ValueError as exc:
            raise ConfigError(f"{where}.headers: {exc}") from None
    ignored = _strings(raw.get("ignore_actions"), f"{where}.ignore_actions")
    if set(ignored) - set(_ACTIONS):
        raise ConfigError(f"{where}.ignore_actions: expected some of {', '.join(_ACTIONS)}")
    endpoint = EndpointConfig(
        name=raw["name"],
        url=raw["url"],
        headers=tuple(sorted(headers.items())),
        headers_dir=Path(str(raw["headers_dir"])) if raw.get("headers_dir") else None,
        timeout_seconds=_number(raw.get("timeout_seconds", 5.0), f"{where}.timeout_seconds"),
        retry_max_seconds=_number(raw.get("retry_max_seconds", 60.0), f"{where}.retry_max_seconds"),
        batch=_integer(raw.get("batch", 32), f"{where}.batch"),
        ignore_actions=ignored,
        ignore_media_types=_strings(raw.get("ignore_media_types"), f"{where}.ignore_media_types"),
        ca_file=Path(str(raw["ca_file"])) if raw.get("ca_file") else None,
        tls_verify=_flag(raw.get("tls_verify", True), f"{where}.tls_verify"),
    )
    _bounded(endpoint.timeout_seconds, f"{where}.timeout_seconds", above=0)
    _bounded(endpoint.retry_max_seconds, f"{where}.retry_max_seconds", above=0)
    _bounded(endpoint.batch, f"{where}.batch", at_least=1)
    return endpoint


def _notifications(raw: Any) -> NotificationsConfig:
    if not isinstance(raw, dict) or set(raw) - {"endpoints"}:
        raise ConfigError("notifications: expected a mapping with 'endpoints'")
    listed = raw.get("endpoints") or []
    if not isinstance(listed, list):
        raise ConfigError("notifications.endpoints: expected a list")
    endpoints = tuple(_endpoint(i, e) for i, e in enumerate(listed))
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ConfigError("notifications.endpoints: names must be unique")
    return NotificationsConfig(endpoints)


def load(path: Path | None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        raw = loaded
    unknown = set(raw) - set(_SECTIONS) - {"replication", "notifications", "metadata", "upstreams"}
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}")
    special = {"storage": _storage, "http": _http}
    sections: dict[str, Any] = {
        name: special[name](raw[name]) if name in special else _section(name, cls, raw[name])
        for name, cls in _SECTIONS.items()
        if name in raw and raw[name] is not None
    }
    if raw.get("replication") is not None:
        sections["replication"] = _replication(raw["replication"])
    if raw.get("metadata") is not None:
        sections["metadata"] = _metadata(raw["metadata"])
    if raw.get("notifications") is not None:
        sections["notifications"] = _notifications(raw["notifications"])
    if raw.get("upstreams") is not None:
        sections["upstreams"] = _upstreams(raw["upstreams"])
    config = Config(**sections)
    for var, (section, key, kind) in _ENV.items():
        if var in env and env[var] != "":
            try:
                value = kind(env[var])
            except ValueError:
                raise ConfigError(f"{var}: invalid value {env[var]!r}") from None
            config = replace(config, **{section: replace(getattr(config, section), **{key: value})})
    _validate(config)
    return config


def _validate_backup(config: Config) -> None:
    backup = config.backup
    _bounded(backup.interval_seconds, "backup.interval_seconds", at_least=0)
    _bounded(backup.keep, "backup.keep", at_least=1)
    if not backup.interval_seconds:
        return
    if config.storage.driver != "filesystem" or config.metadata.driver != "sqlite":
        raise ConfigError(
            "backup: scheduled backups copy a filesystem store and its SQLite index; with"
            " S3 or PostgreSQL use the store's and the database's own backups"
        )
    root, target = config.storage.root.resolve(), backup.dir.resolve()
    if target == root or root in target.parents or target in root.parents:
        raise ConfigError("backup.dir must be outside storage.root (and not contain it)")


def _validate(config: Config) -> None:
    if ":" not in config.http.addr:
        raise ConfigError(f"http.addr must be host:port, got {config.http.addr!r}")
    try:
        config.http.port  # noqa: B018 - validation by parsing
    except ValueError:
        raise ConfigError(f"http.addr has an invalid port: {config.http.addr!r}") from None
    _bounded(config.http.workers, "http.workers", at_least=1)
    if not 0 <= config.http.drain_seconds <= 300:
        raise ConfigError("http.drain_seconds: expected 0 to 300 seconds")
    idle: object = config.http.body_idle_timeout_seconds
    if isinstance(idle, bool) or not isinstance(idle, int | float) or not 0 < idle <= 3600:
        raise ConfigError(
            f"http.body_idle_timeout_seconds: expected more than 0 up to 3600, got {idle!r}"
        )
    _validate_forwarding(config.http)
    if config.http.tls is not None:
        _validate_tls(config.http.tls)
    _validate_storage(config.storage)
    _validate_metadata(config.metadata)
    _validate_backup(config)
    if config.replication.peers and not config.replication.region:
        raise ConfigError("replication.region is required when peers are configured")
    if config.replication.region and not versions.is_origin(config.replication.region):
        # Peers refuse any other name in a change's stamp: every change would be lost.
        raise ConfigError(
            "replication.region must be 1 to 63 visible ASCII characters, no spaces:"
            f" {config.replication.region[:80]!r}"
        )
    _bounded(config.limits.max_manifest_bytes, "limits.max_manifest_bytes", at_least=1024)
    _validate_log(config.log)
    if config.auth is not None:
        _validate_auth(config.auth, config.http.workers)
        if config.auth.signing_key is None and config.metadata.driver == "postgresql":
            # Replicas each generating a key would refuse each other's tokens.
            raise ConfigError(
                "auth.signing_key is required with metadata.driver: postgresql"
                " (every replica must verify the tokens the others sign)"
            )


def _validate_forwarding(http: HttpConfig) -> None:
    if http.metrics_addr:
        if ":" not in http.metrics_addr:
            raise ConfigError(f"http.metrics_addr must be host:port, got {http.metrics_addr!r}")
        try:
            http.metrics_port  # noqa: B018 - validation by parsing
        except ValueError:
            raise ConfigError(
                f"http.metrics_addr has an invalid port: {http.metrics_addr!r}"
            ) from None
    for entry in http.trusted_proxies:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"http.trusted_proxies: {_shown(entry)} is not an IP address or network"
            ) from None
    for entry in http.relayed_hosts:
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or "/" in entry or "@" in entry:
            raise ConfigError(f"http.relayed_hosts: {_shown(entry)} is not host:port")
    if http.forwarded_header.lower() not in FORWARDED_HEADERS:
        raise ConfigError(
            f"http.forwarded_header: expected one of {', '.join(FORWARDED_HEADERS)}, "
            f"got {_shown(http.forwarded_header)}"
        )


_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _validate_metadata(metadata: MetadataConfig) -> None:
    if metadata.replica_id and not _REPLICA_ID.fullmatch(metadata.replica_id):
        raise ConfigError(
            "metadata.replica_id: up to 63 letters, digits, '.', '_' or '-',"
            f" got {_shown(metadata.replica_id)}"
        )
    if metadata.driver not in METADATA_DRIVERS:
        raise ConfigError(
            f"metadata.driver: expected one of {', '.join(METADATA_DRIVERS)},"
            f" got {_shown(metadata.driver)}"
        )
    pg = metadata.postgresql
    if metadata.driver != "postgresql":
        if pg is not None:
            raise ConfigError("metadata.postgresql is set but metadata.driver is sqlite")
        return
    if pg is None or (not pg.dsn and pg.dsn_file is None):
        raise ConfigError(
            "metadata.postgresql.dsn or metadata.postgresql.dsn_file is required"
            " with metadata.driver: postgresql"
        )
    if pg.dsn and pg.dsn_file is not None:
        raise ConfigError("metadata.postgresql: dsn or dsn_file, not both")
    _bounded(pg.pool_size, "metadata.postgresql.pool_size", at_least=1, at_most=1000)
    pg.connection_string()  # a missing or empty file stops the start-up here, by name


def _validate_log(log: LogConfig) -> None:
    # Checked here, not when logging is set up: a bad level must not crash the start-up.
    levels = logging.getLevelNamesMapping()
    if not isinstance(log.level, str) or log.level.upper() not in levels:
        names = ", ".join(sorted(n.lower() for n in levels if n != "NOTSET"))
        raise ConfigError(f"log.level: expected one of {names}, got {_shown(log.level)}")
    if log.format not in ("json", "text"):
        raise ConfigError(f"log.format: expected json or text, got {_shown(log.format)}")


def _validate_auth(auth: AuthConfig, workers: int) -> None:
    if auth.signing_key is None and workers > 1:
        raise ConfigError("auth.signing_key is required when http.workers > 1")
    _bounded(auth.token_ttl_seconds, "auth.token_ttl_seconds", at_least=1)
    _bounded(auth.refresh_token_ttl_seconds, "auth.refresh_token_ttl_seconds", at_least=1)
    _bounded(auth.reload_interval_seconds, "auth.reload_interval_seconds", above=0)
    _bounded(auth.failure_limit, "auth.failure_limit", at_least=0)
    _bounded(auth.client_failure_limit, "auth.client_failure_limit", at_least=0)
    _bounded(auth.failure_window_seconds, "auth.failure_window_seconds", at_least=0)
