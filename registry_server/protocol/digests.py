"""Digest grammar and content hashing (pure)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from registry_server.protocol import errors

# algorithm ":" encoded, with the encodings the spec registers for sha256/sha512.
_DIGEST_RE = re.compile(r"^(?P<alg>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]+)\Z")
_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"^[a-f0-9]+\Z")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def parse(value: str) -> Digest:
    """Parse and validate a digest; unsupported or malformed digests are DIGEST_INVALID."""
    m = _DIGEST_RE.match(value)
    if not m:
        raise errors.RegistryError(
            errors.DIGEST_INVALID, detail={"digest": value[:200]}, message="invalid digest"
        )
    alg, hexpart = m.group("alg"), m.group("hex")
    expected = _HEX_LEN.get(alg)
    if expected is None:
        raise errors.RegistryError(
            errors.DIGEST_INVALID,
            detail={"digest": value[:200]},
            message=f"unsupported digest algorithm {alg!r}",
        )
    if len(hexpart) != expected or not _HEX_RE.match(hexpart):
        raise errors.RegistryError(
            errors.DIGEST_INVALID, detail={"digest": value[:200]}, message="invalid digest encoding"
        )
    return Digest(alg, hexpart)


def looks_like_digest(reference: str) -> bool:
    """Whether a manifest reference is meant as a digest (tags have no colon); it may
    still be malformed, which ``parse`` then says."""
    return ":" in reference


def is_digest(value: str) -> bool:
    """Whether ``value`` is a valid, supported digest (``parse`` would accept it)."""
    try:
        parse(value)
    except errors.RegistryError:
        return False
    return True


def of_bytes(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
