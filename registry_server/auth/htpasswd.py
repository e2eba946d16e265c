"""htpasswd files: ``name:hash`` lines, bcrypt hashes only (pure: no I/O here)."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("registry_server.auth")

_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")


class HtpasswdError(ValueError):
    """The file is not an htpasswd file at all (as opposed to a refused entry)."""


def is_bcrypt(value: str) -> bool:
    return _BCRYPT.match(value) is not None


def bcrypt_cost(value: str) -> int | None:
    """The cost (log2 of the rounds) of a bcrypt hash; None when it is not one."""
    match = _BCRYPT.match(value)
    return int(match.group(1)) if match else None


def hash_kind(value: str) -> str:
    """A short name for a hash format, for log lines (never the hash itself)."""
    if value.startswith("$apr1$"):
        return "apr1-md5"
    if value.startswith("{SHA}"):
        return "sha1"
    if value.startswith(("$1$", "$5$", "$6$", "$y$")):
        return "crypt"
    if value.startswith("$2"):
        return "malformed-bcrypt"
    return "plain-or-des"


def parse(text: str, source: str = "htpasswd") -> dict[str, str]:
    """Users and their bcrypt hashes.

    Blank lines and ``#`` comments are skipped. An entry with another hash type is refused
    with a log line naming the user and the hash type, and the rest of the file is used. A
    line without a ``name:`` prefix or a user listed twice makes the whole file invalid.
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name:
            raise HtpasswdError(f"{source}:{number}: expected 'name:hash'")
        if name in users:
            raise HtpasswdError(f"{source}:{number}: user {name!r} is listed twice")
        if not is_bcrypt(secret):
            log.error(
                "htpasswd entry refused: only bcrypt hashes are accepted",
                extra={"file": source, "line": number, "user": name, "hash": hash_kind(secret)},
            )
            continue
        users[name] = secret
    return users
