"""The access policy file: users, robots, admins and per-repository rules (pure: no I/O).

The format is described in docs/auth.md. Parsing is strict (unknown keys, duplicate names
and non-bcrypt hashes are errors) so that a typo never silently grants or removes access;
the caller keeps the previous policy when parsing fails.

A policy may be split into shards: the main file lists them (`shards`, each a file name
and the SHA-256 of its bytes) and `merge` joins the parsed parts into one Policy. The
reader (auth.reloading) checks the digests, so a set of files written at different
moments is never merged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry_server.auth import htpasswd, scopes
from registry_server.protocol import quotas, sizes, tag_rules

ANY_ACCOUNT = "*"  # in a rule's pull/push/delete lists: every authenticated account


class PolicyError(ValueError):
    """The policy document is invalid; the message names the entry and the reason."""


@dataclass(frozen=True)
class Account:
    """Someone who can log in: a user (people) or a robot (machines)."""

    name: str
    kind: str  # "user" | "robot"
    secret_hash: str  # bcrypt


@dataclass(frozen=True)
class Grant:
    """Actions on the repositories matching a pattern."""

    repository: str
    actions: frozenset[str]


@dataclass(frozen=True)
class Rule:
    repository: str
    pull: frozenset[str] = frozenset()
    push: frozenset[str] = frozenset()
    delete: frozenset[str] = frozenset()
    anonymous_pull: bool = False
    tags: tag_rules.TagRules = tag_rules.NO_RULES
    quota: quotas.Quota = quotas.NO_QUOTA

    def actions_for(self, name: str | None) -> set[str]:
        found: set[str] = set()
        if name is None:
            if self.anonymous_pull:
                found.add("pull")
            return found
        for action, who in (("pull", self.pull), ("push", self.push), ("delete", self.delete)):
            if name in who or ANY_ACCOUNT in who:
                found.add(action)
        if self.anonymous_pull:
            found.add("pull")  # what anyone may do, an account may do too
        return found


@dataclass(frozen=True)
class Policy:
    admins: frozenset[str] = frozenset()
    accounts: Mapping[str, Account] = field(default_factory=dict)
    robot_access: Mapping[str, tuple[Grant, ...]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # True only for the no-policy-file policy, where every account may do everything.
    everyone_admin: bool = False

    def administers(self, name: str | None) -> bool:
        """Whether ``name`` has every right, including replication (``registry:replication:*``)."""
        return name is not None and (self.everyone_admin or name in self.admins)

    def actions(self, name: str | None, repository: str) -> frozenset[str]:
        """What ``name`` (None: anonymous) may do on ``repository``.

        Grants add up; there are no deny rules. ``push`` includes ``pull``: every push
        starts by reading what is already there.
        """
        if self.administers(name):
            return scopes.REPOSITORY_ACTIONS
        found: set[str] = set()
        index = self._index
        for rule in (*index.rules_exact.get(repository, ()), *index.rules_patterns):
            if scopes.matches(rule.repository, repository):
                found |= rule.actions_for(name)
        if name is not None:
            exact = index.robot_exact.get(name)
            if exact is not None:
                found |= exact.get(repository, frozenset())
            for grant in index.robot_patterns.get(name, ()):
                if scopes.matches(grant.repository, repository):
                    found |= grant.actions
        if "push" in found:
            found.add("pull")
        return frozenset(found)

    @functools.cached_property
    def _index(self) -> _Index:
        # Built once per policy: a policy may name tens of thousands of repositories,
        # and a request should look up its own, not scan them all.
        return _Index.of(self)

    @functools.cached_property
    def _rules_with_tags(self) -> tuple[Rule, ...]:
        # Asked on every manifest push: only the rules that carry tag rules are matched.
        return tuple(rule for rule in self.rules if rule.tags != tag_rules.NO_RULES)

    def tag_rules(self, repository: str) -> tag_rules.TagRules:
        """Immutable tags and retention for ``repository`` (every matching rule counts)."""
        return tag_rules.combine(
            rule.tags
            for rule in self._rules_with_tags
            if scopes.matches(rule.repository, repository)
        )

    @functools.cached_property
    def _rules_with_quotas(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.quota != quotas.NO_QUOTA)

    def quota(self, repository: str) -> quotas.Quota:
        """The limits on ``repository`` (every matching rule's quota holds)."""
        return quotas.combine(
            rule.quota
            for rule in self._rules_with_quotas
            if scopes.matches(rule.repository, repository)
        )

    def catalog(self, name: str | None) -> bool:
        """Whether ``name`` may list the catalog (filtered to what it may pull)."""
        if name is not None:
            return True
        return any(rule.anonymous_pull for rule in self.rules)


@dataclass(frozen=True)
class _Index:
    """Exact repository names by dictionary, patterns in a (short) list."""

    rules_exact: Mapping[str, tuple[Rule, ...]]
    rules_patterns: tuple[Rule, ...]
    robot_exact: Mapping[str, Mapping[str, frozenset[str]]]
    robot_patterns: Mapping[str, tuple[Grant, ...]]

    @classmethod
    def of(cls, policy: Policy) -> _Index:
        rules_exact: dict[str, list[Rule]] = {}
        rules_patterns = []
        for rule in policy.rules:
            if scopes.is_literal(rule.repository):
                rules_exact.setdefault(rule.repository, []).append(rule)
            else:
                rules_patterns.append(rule)
        robot_exact: dict[str, dict[str, frozenset[str]]] = {}
        robot_patterns: dict[str, tuple[Grant, ...]] = {}
        for name, grants in policy.robot_access.items():
            exact: dict[str, frozenset[str]] = {}
            for grant in grants:
                if scopes.is_literal(grant.repository):
                    exact[grant.repository] = (
                        exact.get(grant.repository, frozenset()) | grant.actions
                    )
            robot_exact[name] = exact
            patterns = tuple(g for g in grants if not scopes.is_literal(g.repository))
            if patterns:
                robot_patterns[name] = patterns
        return cls(
            {k: tuple(v) for k, v in rules_exact.items()},
            tuple(rules_patterns),
            robot_exact,
            robot_patterns,
        )


# Without a policy file every account that can log in may do everything, and anonymous
# callers nothing: the behaviour of an htpasswd-only registry.
AUTHENTICATED_FULL_ACCESS = Policy(
    everyone_admin=True,
    rules=(
        Rule(
            "**",
            pull=frozenset({ANY_ACCOUNT}),
            push=frozenset({ANY_ACCOUNT}),
            delete=frozenset({ANY_ACCOUNT}),
        ),
    ),
)


# --- parsing ---------------------------------------------------------------------------

_TOP = {"version", "admins", "users", "robots", "rules"}


def _mapping(value: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: expected a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    missing = required - set(value)
    if missing:
        raise PolicyError(f"{where}: missing keys {sorted(missing)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip() or ":" in value:
        raise PolicyError(f"{where}: expected a non-empty name without ':' or outer spaces")
    return value


def _names(value: Any, where: str) -> frozenset[str]:
    items = _list(value, where)
    return frozenset(
        item if item == ANY_ACCOUNT else _name(item, f"{where}[{i}]")
        for i, item in enumerate(items)
    )


def _pattern(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{where}: expected a repository name or pattern")
    try:
        scopes.validate_pattern(value)
    except scopes.PatternError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return value


def _hash(value: Any, where: str) -> str:
    if not isinstance(value, str) or not htpasswd.is_bcrypt(value):
        raise PolicyError(f"{where}: expected a bcrypt hash ($2a$, $2b$ or $2y$)")
    return value


def _actions(value: Any, where: str) -> frozenset[str]:
    items = _list(value, where)
    actions: set[str] = set()
    for i, item in enumerate(items):
        if item == "*":
            actions |= scopes.REPOSITORY_ACTIONS
        elif item in scopes.REPOSITORY_ACTIONS:
            actions.add(item)
        else:
            raise PolicyError(f"{where}[{i}]: expected one of pull, push, delete, *")
    if not actions:
        raise PolicyError(f"{where}: expected at least one action")
    return frozenset(actions)


_RULE_KEYS = {
    "repository", "pull", "push", "delete", "anonymous_pull", "immutable_tags", "retention",
    "quota",
}  # fmt: skip


# A century: a bound that catches a value meant in seconds.
_MAX_UNTAGGED_DAYS = 36500


def _tag_patterns(value: Any, where: str) -> tuple[str, ...]:
    patterns = []
    for i, item in enumerate(_list(value, where)):
        if not isinstance(item, str):
            raise PolicyError(f"{where}[{i}]: expected a tag pattern")
        try:
            patterns.append(tag_rules.validate_pattern(item))
        except tag_rules.TagPatternError as exc:
            raise PolicyError(f"{where}[{i}]: {exc}") from None
    return tuple(patterns)


def _tag_rules(entry: Mapping[str, Any], where: str) -> tag_rules.TagRules:
    immutable = _tag_patterns(entry.get("immutable_tags"), f"{where}.immutable_tags")
    retention = None
    if entry.get("retention") is not None:
        rwhere = f"{where}.retention"
        raw = _mapping(entry["retention"], rwhere, {"keep_last", "protect", "untagged_days"}, set())
        keep = raw.get("keep_last")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise PolicyError(f"{rwhere}.keep_last: expected a positive integer")
        untagged = raw.get("untagged_days")
        if untagged is not None and (
            isinstance(untagged, bool)
            or not isinstance(untagged, int | float)
            or not 0 < untagged <= _MAX_UNTAGGED_DAYS
        ):
            raise PolicyError(
                f"{rwhere}.untagged_days: expected a number of days above 0, at most"
                f" {_MAX_UNTAGGED_DAYS}"
            )
        if keep is None and untagged is None:
            raise PolicyError(f"{rwhere}: keep_last or untagged_days is required")
        protect = _tag_patterns(raw.get("protect"), f"{rwhere}.protect")
        retention = tag_rules.Retention(
            keep, protect, None if untagged is None else float(untagged)
        )
    return tag_rules.TagRules(immutable, retention)


def _quota(value: Any, where: str) -> quotas.Quota:
    if value is None:
        return quotas.NO_QUOTA
    raw = _mapping(value, where, {"storage", "tags"}, set())
    storage = None
    if raw.get("storage") is not None:
        try:
            storage = sizes.parse_bytes(raw["storage"])
        except sizes.QuantityError as exc:
            raise PolicyError(f"{where}.storage: {exc}") from None
    tags = raw.get("tags")
    if tags is not None and (isinstance(tags, bool) or not isinstance(tags, int) or tags < 0):
        raise PolicyError(f"{where}.tags: expected a number of tags (0 or more)")
    return quotas.Quota(storage, tags)


def _add_account(accounts: dict[str, Account], account: Account, where: str) -> None:
    if account.name in accounts:
        raise PolicyError(f"{where}: the name {account.name!r} is used twice")
    accounts[account.name] = account


@dataclass(frozen=True)
class ShardRef:
    """One shard file of a split policy: its name, next to the main file, and the
    SHA-256 (hex) of its bytes as the writer meant them."""

    file: str
    sha256: str


_SHARD_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,252}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def parse_main(document: Any) -> tuple[Policy, tuple[ShardRef, ...]]:
    """The main policy file: a policy whose `shards` (optional) list more files."""
    top = _mapping(document, "policy", _TOP | {"shards"}, set())
    shards: list[ShardRef] = []
    seen: set[str] = set()
    for i, raw in enumerate(_list(top.get("shards"), "shards")):
        where = f"shards[{i}]"
        entry = _mapping(raw, where, {"file", "sha256"}, {"file", "sha256"})
        name, digest = entry["file"], entry["sha256"]
        if not isinstance(name, str) or not _SHARD_FILE.match(name) or name in seen:
            raise PolicyError(f"{where}.file: expected a distinct file name in the same directory")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise PolicyError(f"{where}.sha256: expected 64 lowercase hex digits")
        seen.add(name)
        shards.append(ShardRef(name, digest))
    return parse({k: v for k, v in top.items() if k != "shards"}), tuple(shards)


def merge(parts: Sequence[tuple[str, Policy]]) -> Policy:
    """One policy from the main file and its shards (`(where, policy)`, main first).

    Admins and rules add up. An account may appear in several shards (a robot whose
    grants are spread over them) only with the same kind and hash; its grants add up.
    """
    if len(parts) == 1:
        return parts[0][1]
    admins: set[str] = set()
    accounts: dict[str, Account] = {}
    access: dict[str, list[Grant]] = {}
    rules: list[Rule] = []
    for where, part in parts:
        admins |= part.admins
        for name, account in part.accounts.items():
            known = accounts.setdefault(name, account)
            if known != account:
                raise PolicyError(f"{where}: the account {name!r} differs from another shard's")
        for name, grants in part.robot_access.items():
            access.setdefault(name, []).extend(grants)
        rules.extend(part.rules)
    return Policy(
        admins=frozenset(admins),
        accounts=accounts,
        robot_access={name: tuple(grants) for name, grants in access.items()},
        rules=tuple(rules),
    )


def parse(document: Any) -> Policy:
    """A policy from a decoded YAML/JSON document."""
    top = _mapping(document, "policy", _TOP, set())
    version = top.get("version", 1)
    if version != 1:
        raise PolicyError(f"version: unsupported version {version!r} (expected 1)")
    accounts: dict[str, Account] = {}
    robot_access: dict[str, tuple[Grant, ...]] = {}
    for i, raw in enumerate(_list(top.get("users"), "users")):
        where = f"users[{i}]"
        entry = _mapping(raw, where, {"name", "password_hash"}, {"name", "password_hash"})
        account = Account(
            _name(entry["name"], f"{where}.name"),
            "user",
            _hash(entry["password_hash"], f"{where}.password_hash"),
        )
        _add_account(accounts, account, where)
    for i, raw in enumerate(_list(top.get("robots"), "robots")):
        where = f"robots[{i}]"
        entry = _mapping(raw, where, {"name", "secret_hash", "access"}, {"name", "secret_hash"})
        account = Account(
            _name(entry["name"], f"{where}.name"),
            "robot",
            _hash(entry["secret_hash"], f"{where}.secret_hash"),
        )
        _add_account(accounts, account, where)
        grants = []
        for j, graw in enumerate(_list(entry.get("access"), f"{where}.access")):
            gwhere = f"{where}.access[{j}]"
            g = _mapping(graw, gwhere, {"repository", "actions"}, {"repository", "actions"})
            grants.append(
                Grant(
                    _pattern(g["repository"], f"{gwhere}.repository"),
                    _actions(g["actions"], f"{gwhere}.actions"),
                )
            )
        robot_access[account.name] = tuple(grants)
    rules = []
    for i, raw in enumerate(_list(top.get("rules"), "rules")):
        where = f"rules[{i}]"
        entry = _mapping(raw, where, _RULE_KEYS, {"repository"})
        anonymous = entry.get("anonymous_pull", False)
        if not isinstance(anonymous, bool):
            raise PolicyError(f"{where}.anonymous_pull: expected true or false")
        rules.append(
            Rule(
                _pattern(entry["repository"], f"{where}.repository"),
                pull=_names(entry.get("pull"), f"{where}.pull"),
                push=_names(entry.get("push"), f"{where}.push"),
                delete=_names(entry.get("delete"), f"{where}.delete"),
                anonymous_pull=anonymous,
                tags=_tag_rules(entry, where),
                quota=_quota(entry.get("quota"), f"{where}.quota"),
            )
        )
    admins = _names(top.get("admins"), "admins")
    if ANY_ACCOUNT in admins:
        raise PolicyError("admins: '*' is not allowed; name each admin")
    return Policy(admins=admins, accounts=accounts, robot_access=robot_access, rules=tuple(rules))


def names_in(policy: Policy) -> Iterable[str]:
    """Every account name the policy refers to (for warnings about unknown names)."""
    seen = set(policy.admins)
    for rule in policy.rules:
        seen |= rule.pull | rule.push | rule.delete
    seen.discard(ANY_ACCOUNT)
    return sorted(seen)
