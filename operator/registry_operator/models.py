"""Typed, frozen views of a `Registry` custom resource. Pure: no I/O here.

The API server already enforces the CRD schema and CEL rules; parsing checks again so a
body that slipped past them (an old CRD, a hand-made test body) fails with a clear
`InvalidSpec` instead of a KeyError deep inside rendering.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Mapping
from typing import Any

from registry_operator import API_VERSION

KIND = "Registry"
PLURAL = "registries"
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/berth-dev/berth"
DEFAULT_PVC_SIZE = "10Gi"
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")
LOG_LEVELS = ("debug", "info", "warning", "error")

_QUANTITY = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidSpec(ValueError):
    """The custom resource cannot be turned into manifests; retrying will not help."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


Storage = PvcStorage | EmptyDirStorage


@dataclasses.dataclass(frozen=True)
class Tls:
    secret_name: str


@dataclasses.dataclass(frozen=True)
class Ingress:
    host: str
    class_name: str | None = None
    tls: Tls | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"


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
    storage: Storage = dataclasses.field(default_factory=PvcStorage)
    ingress: Ingress | None = None


@dataclasses.dataclass(frozen=True)
class Registry:
    owner: Owner
    generation: int
    spec: Spec
    deleting: bool = False


def parse_registry(body: Mapping[str, Any], *, image: str | None = None) -> Registry:
    """Parse a whole custom resource body; `image` overrides the default server image."""
    meta = _mapping(body.get("metadata"), "metadata")
    owner = Owner(
        name=_str(meta.get("name"), "metadata.name"),
        namespace=_str(meta.get("namespace"), "metadata.namespace"),
        uid=_str(meta.get("uid", ""), "metadata.uid"),
    )
    generation = meta.get("generation", 0)
    spec = parse_spec(_mapping(body.get("spec", {}), "spec"), image=image)
    return Registry(
        owner=owner,
        generation=int(generation),
        spec=spec,
        deleting=meta.get("deletionTimestamp") is not None,
    )


def parse_spec(raw: Mapping[str, Any], *, image: str | None = None) -> Spec:
    """Parse `.spec`; `image` replaces the default server image (tests pin it)."""
    replicas = raw.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise InvalidSpec("spec.replicas", "must be a non-negative integer")
    storage = _storage(_mapping(raw.get("storage", {"pvc": {}}), "spec.storage"))
    shared = isinstance(storage, PvcStorage) and storage.shared
    if replicas > 1 and not shared:
        raise InvalidSpec(
            "spec.replicas",
            "replicas > 1 requires shared storage (storage.pvc with accessModes ReadWriteMany)",
        )
    region = raw.get("region")
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
        storage=storage,
        ingress=_ingress(raw.get("ingress")),
    )


def _storage(raw: Mapping[str, Any]) -> Storage:
    kinds = [key for key in ("pvc", "s3", "emptyDir") if key in raw]
    if len(kinds) != 1:
        raise InvalidSpec(
            "spec.storage", "exactly one of storage.pvc, storage.s3 or storage.emptyDir must be set"
        )
    if kinds == ["s3"]:
        # The server's configuration has no object-store driver yet; rendering a config
        # it would reject (or silently ignore) is worse than saying so here.
        raise InvalidSpec("spec.storage.s3", "S3 storage is not supported by this server version")
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
    delete = pvc.get("deleteOnRegistryDelete", False)
    if not isinstance(delete, bool):
        raise InvalidSpec("spec.storage.pvc.deleteOnRegistryDelete", "must be a boolean")
    return PvcStorage(
        size=_quantity(pvc.get("size", DEFAULT_PVC_SIZE), "spec.storage.pvc.size"),
        storage_class_name=(
            None if class_name is None else _str(class_name, "spec.storage.pvc.storageClassName")
        ),
        access_modes=modes,
        delete_on_registry_delete=delete,
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
    return Ingress(
        host=host,
        class_name=None if class_name is None else _str(class_name, "spec.ingress.className"),
        tls=tls,
        annotations={
            _str(k, "spec.ingress.annotations"): _str(v, f"spec.ingress.annotations.{k}")
            for k, v in sorted(annotations.items())
        },
    )


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


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpec(field, "must be an object")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidSpec(field, "must be a list")
    return list(value)
