"""Token scopes and repository patterns (pure: no I/O here).

A scope names one resource and the actions wanted on it, ``type:name:actions``, for example
``repository:team-a/api:pull,push`` or ``registry:catalog:*``. Several scopes may travel in
one ``scope`` parameter separated by spaces, or in repeated parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from registry_server.auth.model import ADMIN_ONLY, CATALOG, Access
from registry_server.protocol import errors, names

REPOSITORY = "repository"
REGISTRY = "registry"
REPOSITORY_ACTIONS = frozenset({"pull", "push", "delete"})


def parse_scope(text: str) -> Access | None:
    """One scope, or None when it is not of the form ``type:name:actions``.

    The name may itself contain colons (a registry host with a port), so the type ends at
    the first colon and the actions start after the last one. A resource class, as in
    ``repository(plugin):name:pull``, is ignored.
    """
    first = text.find(":")
    last = text.rfind(":")
    if first <= 0 or last == first:
        return None
    kind = text[:first]
    if "(" in kind and kind.endswith(")"):
        kind = kind[: kind.index("(")]
    name = text[first + 1 : last]
    actions = frozenset(a for a in text[last + 1 :].split(",") if a)
    if not kind or not name or not actions:
        return None
    return Access(kind, name, actions)


def parse_scopes(params: Iterable[str]) -> list[Access]:
    """All scopes in the given ``scope`` parameters; malformed ones are skipped."""
    found: list[Access] = []
    for param in params:
        for text in param.split():
            access = parse_scope(text)
            if access is not None:
                found.append(access)
    return merge(found)


def merge(accesses: Iterable[Access]) -> list[Access]:
    """Combine entries for the same resource, keeping first-seen order."""
    combined: dict[tuple[str, str], set[str]] = {}
    for access in accesses:
        combined.setdefault((access.type, access.name), set()).update(access.actions)
    return [Access(t, n, frozenset(a)) for (t, n), a in combined.items() if a]


def requested_repository_actions(access: Access) -> frozenset[str]:
    """The repository actions a scope asks for; ``*`` asks for all of them."""
    if "*" in access.actions:
        return REPOSITORY_ACTIONS
    return access.actions & REPOSITORY_ACTIONS


def valid_repository(name: str) -> bool:
    try:
        names.validate_name(name)
    except errors.RegistryError:
        return False
    return True


def admin_only(access: Access) -> Access | None:
    """The admin-only resource ``access`` names (replication, accounts), if it names one."""
    for resource in ADMIN_ONLY:
        if access.type == resource.type and access.name == resource.name:
            return resource
    return None


def is_catalog(access: Access) -> bool:
    return access.type == CATALOG.type and access.name == CATALOG.name and "*" in access.actions


def covers(granted: Iterable[Access], wanted: Access) -> bool:
    """Whether the granted accesses include every action of ``wanted``."""
    have: set[str] = set()
    for access in granted:
        if access.type == wanted.type and access.name == wanted.name:
            have.update(access.actions)
    return wanted.actions <= have


def challenge_scope(wanted: Iterable[Access]) -> str:
    """The ``scope`` value of a challenge: space separated, actions in a stable order."""
    parts = []
    for access in wanted:
        order = ["pull", "push", "delete"]
        actions = [a for a in order if a in access.actions]
        actions += sorted(access.actions - set(order))
        parts.append(f"{access.type}:{access.name}:{','.join(actions)}")
    return " ".join(parts)


# --- repository patterns --------------------------------------------------------------


class PatternError(ValueError):
    """A repository pattern that cannot be used."""


_PATTERN_CHARS = re.compile(r"^[a-z0-9._/*?-]+\Z")


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A repository pattern as a regular expression.

    ``*`` matches within one path component (no ``/``), ``**`` matches across components
    (anything, including nothing), ``?`` matches one character other than ``/``. Everything
    else is literal, so ``team-a/api`` matches only itself.
    """
    if not pattern or not _PATTERN_CHARS.match(pattern):
        raise PatternError(
            f"invalid repository pattern {pattern!r}: use lowercase names, '/', '*', '**', '?'"
        )
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def is_literal(pattern: str) -> bool:
    """Whether the pattern names one repository (no wildcard): matched by equality."""
    return "*" not in pattern and "?" not in pattern


def validate_pattern(pattern: str) -> None:
    """Raise PatternError for a pattern that cannot be used. A literal name is only
    checked, not compiled: a policy may name tens of thousands of them."""
    if is_literal(pattern):
        if not pattern or not _PATTERN_CHARS.match(pattern):
            raise PatternError(
                f"invalid repository pattern {pattern!r}: use lowercase names, '/', '*', '**', '?'"
            )
        return
    compile_pattern(pattern)


def matches(pattern: str, repository: str) -> bool:
    if is_literal(pattern):
        return pattern == repository
    return compile_pattern(pattern).match(repository) is not None
