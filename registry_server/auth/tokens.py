"""Signed JSON Web Tokens: the signing key, issuing and verifying (pure but for key files).

Tokens carry ``iss``, ``sub``, ``aud``, ``exp``, ``nbf``, ``iat``, ``jti`` and ``access``
(a list of ``{type, name, actions}``). Verification accepts exactly one algorithm, the one
that belongs to our key type, so ``alg: none`` and HMAC-with-the-public-key forgeries fail
before any signature is computed.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from registry_server.auth.model import Access

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_REQUIRED = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"]
# Clock skew tolerated between replicas (and between issuing and verifying).
LEEWAY_SECONDS = 10


class SigningKeyError(ValueError):
    """The signing key cannot be used."""


class TokenInvalid(Exception):
    """A token that must not be accepted; the message says why (never the token)."""


@dataclass(frozen=True)
class SigningKey:
    private: PrivateKey
    algorithm: str
    kid: str

    @property
    def public(self) -> PublicKey:
        return self.private.public_key()

    @classmethod
    def from_private(cls, key: Any) -> SigningKey:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = _EC_ALGORITHMS.get(key.curve.name)
            if algorithm is None:
                raise SigningKeyError(
                    f"unsupported EC curve {key.curve.name}: use P-256, P-384, P-521"
                )
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise SigningKeyError(f"RSA key of {key.key_size} bits is too small (2048 minimum)")
            algorithm = "RS256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "EdDSA"
        else:
            raise SigningKeyError(
                f"unsupported key type {type(key).__name__}: use EC, RSA or Ed25519"
            )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:15]).decode()
        return cls(key, algorithm, kid)

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"not an unencrypted PEM private key: {exc}") from None
        return cls.from_private(key)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_pem(data)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private(ec.generate_private_key(ec.SECP256R1()))


@dataclass(frozen=True)
class Claims:
    subject: str
    access: tuple[Access, ...]
    issued_at: int
    expires_at: int
    token_id: str
    extra: dict[str, Any]


def _access_claim(access: Sequence[Access]) -> list[dict[str, Any]]:
    return [{"type": a.type, "name": a.name, "actions": sorted(a.actions)} for a in access]


def _parse_access(value: Any) -> tuple[Access, ...]:
    if not isinstance(value, list):
        raise TokenInvalid("access claim is not a list")
    found = []
    for entry in value:
        if not isinstance(entry, dict):
            raise TokenInvalid("access entry is not an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not (
            isinstance(kind, str)
            and isinstance(name, str)
            and isinstance(actions, list)
            and all(isinstance(a, str) for a in actions)
        ):
            raise TokenInvalid("access entry is malformed")
        found.append(Access(kind, name, frozenset(actions)))
    return tuple(found)


class TokenCodec:
    """Issues and verifies tokens for one issuer with one key."""

    def __init__(
        self, key: SigningKey, issuer: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = key
        self.issuer = issuer
        self._clock = clock

    def issue(
        self,
        subject: str,
        audience: str,
        ttl_seconds: int,
        access: Sequence[Access] = (),
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, Claims]:
        now = int(self._clock())
        claims = Claims(
            subject=subject,
            access=tuple(access),
            issued_at=now,
            expires_at=now + ttl_seconds,
            token_id=secrets.token_urlsafe(18),
            extra=dict(extra or {}),
        )
        payload: dict[str, Any] = {
            **claims.extra,
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": claims.expires_at,
            "nbf": now,
            "iat": now,
            "jti": claims.token_id,
            "access": _access_claim(access),
        }
        token = jwt.encode(
            payload, self.key.private, algorithm=self.key.algorithm, headers={"kid": self.key.kid}
        )
        return token, claims

    def _check_time(self, payload: dict[str, Any]) -> None:
        times = [payload.get(k) for k in ("exp", "nbf", "iat")]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise TokenInvalid("exp, nbf and iat must be numbers")
        exp, nbf, iat = (float(t) for t in times)  # type: ignore[arg-type]
        now = self._clock()
        if now >= exp + LEEWAY_SECONDS:
            raise TokenInvalid("expired")
        if now < nbf - LEEWAY_SECONDS or now < iat - LEEWAY_SECONDS:
            raise TokenInvalid("not yet valid")

    def verify(self, token: str, audience: str) -> Claims:
        # A JWT is ASCII; anything else (header bytes that were not ASCII) cannot be one,
        # and a surrogate escape would fail to encode inside the JWT library.
        if not token.isascii():
            raise TokenInvalid("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("not a JWT") from None
        # Checked by decode() too; said here so that the reason in the log is precise.
        if header.get("alg") != self.key.algorithm:
            raise TokenInvalid(f"algorithm {header.get('alg')!r} is not accepted")
        try:
            payload = jwt.decode(
                token,
                self.key.public,
                algorithms=[self.key.algorithm],
                audience=audience,
                issuer=self.issuer,
                # The time window is checked below, against our own (injectable) clock.
                options={
                    "require": _REQUIRED,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenInvalid("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("bad signature") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"invalid: {type(exc).__name__}") from None
        self._check_time(payload)
        subject = payload["sub"]
        if not isinstance(subject, str):
            raise TokenInvalid("subject is not a string")
        if not isinstance(payload["jti"], str):
            raise TokenInvalid("jti is not a string")
        known = {*_REQUIRED, "access"}
        return Claims(
            subject=subject,
            access=_parse_access(payload.get("access", [])),
            issued_at=int(payload["iat"]),
            expires_at=int(payload["exp"]),
            token_id=payload["jti"],
            extra={k: v for k, v in payload.items() if k not in known},
        )
