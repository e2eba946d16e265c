"""Repository name, tag and reference grammar (OCI distribution spec), pure."""

from __future__ import annotations

import re

from registry_server.protocol import digests, errors

# <name> components: lowercase alphanumerics separated by ., _, __, or any number of -.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        raise errors.RegistryError(errors.NAME_INVALID, detail={"name": name[:300]})
    return name


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and bool(_NAME_RE.match(name))


def validate_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise errors.RegistryError(errors.TAG_INVALID, detail={"tag": tag[:300]})
    return tag


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG_RE.match(tag))


def parse_reference(reference: str) -> str | digests.Digest:
    """A manifest reference is a tag or a digest."""
    if digests.looks_like_digest(reference):
        return digests.parse(reference)
    if not _TAG_RE.match(reference):
        raise errors.RegistryError(
            errors.MANIFEST_INVALID,
            detail={"reference": reference[:300]},
            message="invalid reference",
        )
    return reference
