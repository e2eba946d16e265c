"""Token signing and verification, including the classic forgeries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from registry_server.auth.model import Access
from registry_server.auth.tokens import SigningKey, SigningKeyError, TokenCodec, TokenInvalid

AUDIENCE = "berth"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def codec(key: SigningKey | None = None, clock: Clock | None = None) -> TokenCodec:
    return TokenCodec(key or SigningKey.generate(), "berth-issuer", clock or Clock())


ACCESS = [Access.repository("team-a/api", "pull", "push")]


def pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
def test_round_trip_for_each_key_type(key: Any, algorithm: str, tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(key))
    signing = SigningKey.load(path)
    assert signing.algorithm == algorithm
    c = codec(signing)
    token, issued = c.issue("alice", AUDIENCE, 300, ACCESS)
    header = json.loads(unb64(token.split(".")[0]))
    assert header["alg"] == algorithm and header["kid"] == signing.kid
    claims = c.verify(token, AUDIENCE)
    assert claims.subject == "alice"
    assert claims.access == tuple(ACCESS)
    assert claims.expires_at == issued.expires_at == int(NOW) + 300
    payload = json.loads(unb64(token.split(".")[1]))
    assert set(payload) == {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access"}
    assert payload["access"] == [
        {"type": "repository", "name": "team-a/api", "actions": ["pull", "push"]}
    ]


def test_unusable_keys(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(SigningKeyError, match="too small"):
        SigningKey.from_private(small)
    with pytest.raises(SigningKeyError, match="PEM"):
        SigningKey.from_pem(b"not a key")
    with pytest.raises(SigningKeyError, match="cannot read"):
        SigningKey.load(tmp_path / "missing.pem")


def test_token_ids_are_unique() -> None:
    c = codec()
    ids = {c.verify(c.issue("a", AUDIENCE, 60)[0], AUDIENCE).token_id for _ in range(20)}
    assert len(ids) == 20


def test_expired_and_not_yet_valid() -> None:
    clock = Clock()
    c = codec(clock=clock)
    token, _ = c.issue("alice", AUDIENCE, 60, ACCESS)
    clock.now = NOW + 60 + 5  # within the leeway
    c.verify(token, AUDIENCE)
    clock.now = NOW + 60 + 30
    with pytest.raises(TokenInvalid, match="expired"):
        c.verify(token, AUDIENCE)
    clock.now = NOW - 120  # issued "in the future" from this verifier's point of view
    with pytest.raises(TokenInvalid, match="not yet valid"):
        c.verify(token, AUDIENCE)


def test_wrong_audience_and_issuer() -> None:
    key = SigningKey.generate()
    c = codec(key)
    token, _ = c.issue("alice", "other-service", 60, ACCESS)
    with pytest.raises(TokenInvalid, match="audience"):
        c.verify(token, AUDIENCE)
    foreign = TokenCodec(key, "someone-else", Clock())
    token, _ = foreign.issue("alice", AUDIENCE, 60, ACCESS)
    with pytest.raises(TokenInvalid, match="issuer"):
        c.verify(token, AUDIENCE)


def test_other_key_is_refused() -> None:
    token, _ = codec().issue("alice", AUDIENCE, 60, ACCESS)
    with pytest.raises(TokenInvalid, match="signature"):
        codec().verify(token, AUDIENCE)


def test_tampered_payload_is_refused() -> None:
    c = codec()
    token, _ = c.issue("alice", AUDIENCE, 60, ACCESS)
    header, payload, signature = token.split(".")
    claims = json.loads(unb64(payload))
    claims["access"][0]["name"] = "team-b/api"
    forged = ".".join([header, b64(json.dumps(claims).encode()), signature])
    with pytest.raises(TokenInvalid):
        c.verify(forged, AUDIENCE)
    # A flipped signature byte, too.
    raw = bytearray(unb64(signature))
    raw[5] ^= 1
    with pytest.raises(TokenInvalid):
        c.verify(".".join([header, payload, b64(bytes(raw))]), AUDIENCE)


def _payload(**overrides: Any) -> dict[str, Any]:
    base = {
        "iss": "berth-issuer",
        "sub": "root",
        "aud": AUDIENCE,
        "exp": int(NOW) + 300,
        "nbf": int(NOW),
        "iat": int(NOW),
        "jti": "x",
        "access": [{"type": "repository", "name": "a", "actions": ["pull", "push", "delete"]}],
    }
    base.update(overrides)
    return base


def test_alg_none_is_refused() -> None:
    c = codec()
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(_payload()).encode())}."
        with pytest.raises(TokenInvalid, match="not accepted"):
            c.verify(token, AUDIENCE)


@pytest.mark.parametrize("fmt", ["pem", "der"])
def test_hmac_with_the_public_key_is_refused(fmt: str) -> None:
    """The RSA/HMAC confusion: sign HS256 with the (public) verification key as secret."""
    key = SigningKey.from_private(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    c = codec(key)
    encoding = serialization.Encoding.PEM if fmt == "pem" else serialization.Encoding.DER
    secret = key.public.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64(json.dumps(_payload()).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(TokenInvalid, match="not accepted"):
        c.verify(f"{header}.{payload}.{b64(signature)}", AUDIENCE)


def test_another_asymmetric_algorithm_is_refused() -> None:
    """An RS256 token, validly signed by some other RSA key, against our EC key."""
    other = SigningKey.from_private(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    token, _ = TokenCodec(other, "berth-issuer", Clock()).issue("a", AUDIENCE, 60)
    with pytest.raises(TokenInvalid, match="not accepted"):
        codec().verify(token, AUDIENCE)


@pytest.mark.parametrize("missing", ["exp", "nbf", "iat", "jti", "sub", "iss", "aud"])
def test_missing_claims_are_refused(missing: str) -> None:
    import jwt

    key = SigningKey.generate()
    c = codec(key)
    payload = _payload()
    del payload[missing]
    token = jwt.encode(payload, key.private, algorithm=key.algorithm)
    with pytest.raises(TokenInvalid):
        c.verify(token, AUDIENCE)


@pytest.mark.parametrize(
    "access",
    ["all", [1], [{"type": "repository", "name": "a", "actions": "pull"}], [{"type": 1}]],
)
def test_malformed_access_claim_is_refused(access: Any) -> None:
    import jwt

    key = SigningKey.generate()
    token = jwt.encode(_payload(access=access), key.private, algorithm=key.algorithm)
    with pytest.raises(TokenInvalid, match="access"):
        codec(key).verify(token, AUDIENCE)


def test_garbage_is_refused() -> None:
    for token in ["", "abc", "a.b.c", "....."]:
        with pytest.raises(TokenInvalid):
            codec().verify(token, AUDIENCE)
