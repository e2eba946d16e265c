"""Manifest parsing and validation (pure).

Manifests are stored byte for byte; this module only reads them to learn what they
reference (blobs, child manifests, a subject) and to reject malformed content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from registry_server.protocol import digests, errors

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"

IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
SUPPORTED_TYPES = IMAGE_TYPES | INDEX_TYPES
_EXTERNAL_LAYER_HINTS = ("foreign", "nondistributable")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: digests.Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    media_type: str
    blobs: tuple[Descriptor, ...]  # config and layers
    children: tuple[Descriptor, ...]  # index entries
    subject: Descriptor | None
    artifact_type: str | None  # as the referrers API reports it
    annotations: dict[str, str] | None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def required_blobs(self) -> list[str]:
        """Digests of the blobs a registry must hold for this manifest, each once.

        Foreign and non-distributable layers live elsewhere by definition and are left out.
        """
        wanted = (
            str(d.digest)
            for d in self.blobs
            if not any(hint in d.media_type for hint in _EXTERNAL_LAYER_HINTS)
        )
        return list(dict.fromkeys(wanted))


def _invalid(message: str) -> errors.RegistryError:
    return errors.RegistryError(
        errors.MANIFEST_INVALID, detail={"reason": message}, message=f"manifest invalid: {message}"
    )


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _invalid(f"{where}.annotations must be a map of strings")
    return dict(value)


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    media_type = value.get("mediaType")
    digest = value.get("digest")
    size = value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType must be a non-empty string")
    if not isinstance(digest, str):
        raise _invalid(f"{where}.digest must be a string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    try:
        parsed = digests.parse(digest)
    except errors.RegistryError:
        raise _invalid(f"{where}.digest {digest[:100]!r} is not a valid digest") from None
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}.artifactType must be a string")
    return Descriptor(
        media_type, parsed, size, artifact_type, _annotations(value.get("annotations"), where)
    )


def _descriptors(value: Any, where: str) -> tuple[Descriptor, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid(f"{where} must be an array")
    return tuple(_descriptor(item, f"{where}[{i}]") for i, item in enumerate(value))


# The fields of the manifest, index and descriptor structures. Go's encoding/json, which
# most clients and registries read manifests with, matches keys without regard to case:
# a "Layers" beside "layers" would be the layers to them, and unseen here.
_FIELDS = {
    name.casefold(): name
    for name in (
        "schemaVersion", "mediaType", "artifactType", "config", "layers", "manifests",
        "subject", "annotations", "digest", "size", "urls", "platform", "data",
    )
}  # fmt: skip
_FIELD_NAMES = frozenset(_FIELDS.values())


class _NotStrict(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not JSON")


# A surrogate escape: the only way a lone surrogate (not Unicode) gets into the text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unicode_only(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise _NotStrict("a string is not valid Unicode") from None
    return dict(pairs)


def _load(body: bytes) -> Any:
    """Strict JSON: UTF-8 without a byte order mark (RFC 8259; Python would also take
    UTF-16 and UTF-32), no NaN or Infinity, no lone surrogate (Go reads it as U+FFFD)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("body is not UTF-8") from None
    # Objects are checked one by one only when a surrogate escape is there at all.
    hook = _unicode_only if _SURROGATE_ESCAPE.search(text) else None
    try:
        return json.loads(text, parse_constant=_constant, object_pairs_hook=hook)
    except _NotStrict as exc:
        raise _invalid(str(exc)) from None
    except ValueError:
        raise _invalid("body is not valid JSON") from None
    except RecursionError:  # nesting deeper than the parser's stack: no manifest looks like that
        raise _invalid("body is nested too deeply") from None


def _fields(value: Any, where: str) -> None:
    """No key of a manifest's or descriptor's object is a field's name in another case."""
    if isinstance(value, dict):
        for key in value.keys() - _FIELD_NAMES:  # the usual keys, spelled right: none
            known = _FIELDS.get(key.casefold())
            if known is not None and key != known:
                raise _invalid(f"{where}: key {key[:40]!r} is {known!r} in another case")


def parse(body: bytes, content_type: str | None) -> Manifest:
    """Parse a pushed manifest; the media type comes from the body or the Content-Type."""
    doc = _load(body)
    if not isinstance(doc, dict):
        raise _invalid("body must be a JSON object")
    _fields(doc, "manifest")
    for name in ("config", "subject"):
        _fields(doc.get(name), name)
    for name in ("layers", "manifests"):
        for i, item in enumerate(doc.get(name) or () if isinstance(doc.get(name), list) else ()):
            _fields(item, f"{name}[{i}]")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    header = (content_type or "").split(";")[0].strip() or None
    media_type = declared or header
    if media_type is None:
        # OCI allows omitting mediaType; infer from the shape, as clients do.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if declared and header and header in SUPPORTED_TYPES and declared != header:
        raise _invalid(f"mediaType {declared!r} does not match Content-Type {header!r}")
    if media_type not in SUPPORTED_TYPES:
        raise _invalid(f"unsupported manifest media type {media_type!r}")
    schema = doc.get("schemaVersion")
    if schema != 2:
        raise _invalid("schemaVersion must be 2")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    annotations = _annotations(doc.get("annotations"), "manifest")

    if media_type in IMAGE_TYPES:
        if "config" not in doc:
            raise _invalid("config is required")
        config = _descriptor(doc["config"], "config")
        layers = _descriptors(doc.get("layers"), "layers")
        if media_type == DOCKER_MANIFEST and "layers" not in doc:
            raise _invalid("layers is required")
        if "manifests" in doc:
            raise _invalid("an image manifest has no manifests field")
        return Manifest(
            media_type,
            (config, *layers),
            (),
            subject,
            artifact_type or config.media_type,
            annotations,
        )

    if "manifests" not in doc:
        raise _invalid("manifests is required in an index")
    if "config" in doc or "layers" in doc:
        # One document read as an index here and as an image elsewhere (the ambiguity
        # of GHSA-77vh-xpmg-72qh): its layers would be served unchecked.
        raise _invalid("an index has no config or layers field")
    children = _descriptors(doc.get("manifests"), "manifests")
    return Manifest(media_type, (), children, subject, artifact_type, annotations)


def negotiate(stored_type: str, accept: list[str]) -> bool:
    """Whether a stored manifest's media type is acceptable to the client.

    Like distribution, we never convert; clients that send no Accept get what is stored.
    """
    if not accept:
        return True
    for item in accept:
        value = item.split(";")[0].strip()
        if value in ("*/*", stored_type, "application/json", "application/*"):
            return True
    return False
