"""Credentials are generated once, then read back from the Secret and kept."""

from __future__ import annotations

import itertools

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry_operator import credentials, models
from registry_operator.rendering import manifests


def _counting() -> credentials.Generators:
    counter = itertools.count(1)
    return credentials.Generators(
        signing_key=lambda: credentials.generate_signing_key(),
        password=lambda: f"password-{next(counter)}",
        hash=lambda password: f"$2b$04$hash-of-{password}",
    )


def _as_secret(creds: credentials.Credentials) -> dict[str, str]:
    data = manifests.secret_data(models.Owner("main", "ns", "uid"), creds)
    return credentials.decode_secret_data(data)


def test_real_generation_is_usable() -> None:
    creds, generated = credentials.load_or_generate({})
    key = serialization.load_pem_private_key(creds.signing_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert bcrypt.checkpw(creds.admin.password.encode(), creds.admin.bcrypt_hash.encode())
    assert creds.admin.password != creds.replication.password
    assert len(creds.admin.password) >= 32
    assert set(generated) == {
        "token.key",
        "admin-password",
        "replication-password",
        "htpasswd:admin",
        "htpasswd:replicator",
    }
    assert creds.htpasswd.splitlines()[0] == f"admin:{creds.admin.bcrypt_hash}"


def test_kept_when_read_back() -> None:
    first, _ = credentials.load_or_generate({}, _counting())
    again, generated = credentials.load_or_generate(_as_secret(first), _counting())
    assert again == first
    assert generated == ()


def test_deleting_a_password_rotates_only_that_account() -> None:
    generators = _counting()
    first, _ = credentials.load_or_generate({}, generators)
    stored = _as_secret(first)
    del stored[credentials.ADMIN_PASSWORD]
    rotated, generated = credentials.load_or_generate(stored, generators)
    assert rotated.admin.password != first.admin.password
    assert rotated.admin.bcrypt_hash == f"$2b$04$hash-of-{rotated.admin.password}"
    assert rotated.replication == first.replication
    assert rotated.signing_key_pem == first.signing_key_pem
    assert generated == ("admin-password", "htpasswd:admin")


def test_unusable_signing_key_is_replaced() -> None:
    first, _ = credentials.load_or_generate({}, _counting())
    stored = _as_secret(first) | {credentials.SIGNING_KEY: "garbage"}
    fixed, generated = credentials.load_or_generate(stored, _counting())
    assert fixed.signing_key_pem != "garbage"
    assert generated == ("token.key",)


def test_missing_hash_is_recomputed_from_the_kept_password() -> None:
    first, _ = credentials.load_or_generate({}, _counting())
    stored = _as_secret(first) | {credentials.HTPASSWD: ""}
    fixed, generated = credentials.load_or_generate(stored, _counting())
    assert fixed.admin.password == first.admin.password
    assert generated == ("htpasswd:admin", "htpasswd:replicator")


def test_undecodable_secret_values_count_as_missing() -> None:
    assert credentials.decode_secret_data({"a": "!!!", "b": "aGk="}) == {"b": "hi"}
    assert credentials.decode_secret_data(None) == {}
