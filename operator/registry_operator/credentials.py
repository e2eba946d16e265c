"""The secrets of one registry: token signing key, admin and replication passwords.

They are generated once, stored in the `<name>-auth` Secret and read back from it on
every later reconcile, so applying the same Registry never changes them. Deleting a key
(or the whole Secret) is how an admin rotates: the missing part is generated again.
Randomness lives only in the `generate_*` functions, so rendering stays deterministic.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
from collections.abc import Callable, Mapping

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ADMIN_USER = "admin"
REPLICATION_USER = "replicator"

# Keys of the Secret's data.
SIGNING_KEY = "token.key"
HTPASSWD = "htpasswd"
POLICY = "policy.yaml"
ADMIN_USERNAME = "admin-username"
ADMIN_PASSWORD = "admin-password"
REPLICATION_USERNAME = "replication-username"
REPLICATION_PASSWORD = "replication-password"


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    password: str
    bcrypt_hash: str

    @property
    def htpasswd_line(self) -> str:
        return f"{self.name}:{self.bcrypt_hash}"


@dataclasses.dataclass(frozen=True)
class Credentials:
    signing_key_pem: str
    admin: User
    replication: User

    @property
    def htpasswd(self) -> str:
        return "".join(f"{user.htpasswd_line}\n" for user in (self.admin, self.replication))


def generate_signing_key() -> str:
    """A fresh EC P-256 private key, PKCS#8 PEM (the server accepts RSA or EC)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return pem.decode("ascii")


def generate_password() -> str:
    return secrets.token_urlsafe(24)


# The passwords are 192 random bits, beyond any brute force at any cost factor; the
# default of 12 only made every new Registry wait half a second of CPU (and the server
# verifies these hashes too).
BCRYPT_ROUNDS = 10


def hash_password(password: str) -> str:
    salt = bcrypt.gensalt(rounds=BCRYPT_ROUNDS)
    return bcrypt.hashpw(password.encode("utf-8"), salt).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Generators:
    """Where new secrets come from; tests swap in fixed ones."""

    signing_key: Callable[[], str] = generate_signing_key
    password: Callable[[], str] = generate_password
    hash: Callable[[str], str] = hash_password


def decode_secret_data(data: Mapping[str, str] | None) -> dict[str, str]:
    """Decode a Secret's base64 `data`; undecodable entries count as missing."""
    decoded: dict[str, str] = {}
    for key, value in (data or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            continue
    return decoded


def load_or_generate(
    existing: Mapping[str, str], generators: Generators = Generators()
) -> tuple[Credentials, tuple[str, ...]]:
    """Keep what the Secret already holds, generate what is missing or unusable.

    Returns the credentials and the names of the parts that were generated now.
    """
    generated: list[str] = []
    signing_key = existing.get(SIGNING_KEY, "")
    if not _is_private_key(signing_key):
        signing_key = generators.signing_key()
        generated.append(SIGNING_KEY)
    hashes = _parse_htpasswd(existing.get(HTPASSWD, ""))
    users = []
    for name, password_key in (
        (ADMIN_USER, ADMIN_PASSWORD),
        (REPLICATION_USER, REPLICATION_PASSWORD),
    ):
        password = existing.get(password_key, "")
        # A hash is only trusted next to the password it was made from: a missing
        # password means rotation, so both are made anew.
        if password and name in hashes:
            users.append(User(name, password, hashes[name]))
            continue
        if not password:
            password = generators.password()
            generated.append(password_key)
        users.append(User(name, password, generators.hash(password)))
        generated.append(f"{HTPASSWD}:{name}")
    admin, replication = users
    return Credentials(signing_key, admin, replication), tuple(generated)


def _parse_htpasswd(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        user, sep, hashed = line.strip().partition(":")
        if sep and user and hashed.startswith("$2"):
            entries[user] = hashed
    return entries


def _is_private_key(pem: str) -> bool:
    if not pem:
        return False
    try:
        serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        return False
    return True
