"""The external back ends a Registry names (S3, PostgreSQL, upstreams' CA bundles):
which of the user's Secrets and ConfigMaps its pods mount, whether they hold the keys the
server reads, and a digest of their content (the pods read them once at start, so a
change must roll them). Pure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping

from registry_operator import models


@dataclasses.dataclass(frozen=True)
class Source:
    """One object the pods mount: (kind, name) and the keys they need from it."""

    kind: str  # "Secret" or "ConfigMap"
    name: str
    keys: tuple[str, ...]
    field: str  # the spec field naming it, for messages


def sources(spec: models.Spec) -> tuple[Source, ...]:
    found: list[Source] = []
    storage = spec.storage
    if isinstance(storage, models.S3Storage):
        found.append(
            Source(
                "Secret",
                storage.credentials_secret,
                (models.S3_ACCESS_KEY, models.S3_SECRET_KEY),
                "spec.storage.s3.credentialsSecretRef",
            )
        )
        if storage.ca is not None:
            found.append(
                Source(
                    "ConfigMap",
                    storage.ca.name,
                    (storage.ca.key,),
                    "spec.storage.s3.caConfigMapRef",
                )
            )
    for i, up in enumerate(spec.upstreams):
        # Read at start: a new CA bundle must roll the pods; a missing one keeps them
        # from starting, which the status must say.
        if up.ca is not None:
            found.append(
                Source("ConfigMap", up.ca.name, (up.ca.key,), f"spec.upstreams[{i}].caConfigMapRef")
            )
    if spec.postgresql is not None:
        ref = spec.postgresql.connection
        found.append(
            Source("Secret", ref.name, (ref.key,), "spec.metadata.postgresql.connectionSecretRef")
        )
    return tuple(found)


def external(spec: models.Spec) -> bool:
    """Whether the Registry depends on a store or a database outside its pods."""
    return isinstance(spec.storage, models.S3Storage) or spec.postgresql is not None


@dataclasses.dataclass(frozen=True)
class Check:
    digest: str = ""  # "" when nothing external is mounted
    problems: tuple[str, ...] = ()  # missing objects or keys, for StorageReady


# (kind, name) -> the object's data, decoded (None: the object does not exist).
Reader = Callable[[str, str], Mapping[str, str] | None]


def check(spec: models.Spec, read: Reader) -> Check:
    needed = sources(spec)
    if not needed:
        return Check()
    problems: list[str] = []
    content: list[object] = []
    for source in needed:
        data = read(source.kind, source.name)
        if data is None:
            problems.append(f"{source.kind} {source.name} ({source.field}) does not exist")
            continue
        missing = [key for key in source.keys if not data.get(key)]
        if missing:
            problems.append(
                f"{source.kind} {source.name} ({source.field}) has no {', '.join(missing)}"
            )
        content.append([source.kind, source.name, {k: data.get(k, "") for k in source.keys}])
    text = json.dumps(content, sort_keys=True)
    return Check("sha256:" + hashlib.sha256(text.encode()).hexdigest(), tuple(problems))
