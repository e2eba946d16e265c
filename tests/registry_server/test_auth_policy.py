"""The policy file format and what it grants (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from registry_server.auth import policy
from registry_server.auth.directory import Directory
from registry_server.auth.model import CATALOG, Access
from registry_server.protocol import quotas, tag_rules

HASH = "$2b$05$" + "b" * 53

DOCUMENT: dict[str, Any] = {
    "version": 1,
    "admins": ["root"],
    "users": [
        {"name": "alice", "password_hash": HASH},
        {"name": "root", "password_hash": HASH},
    ],
    "robots": [
        {
            "name": "team-a-puller",
            "secret_hash": HASH,
            "access": [{"repository": "team-a/api", "actions": ["pull"]}],
        },
        {
            "name": "ci",
            "secret_hash": HASH,
            "access": [{"repository": "team-a/**", "actions": ["push"]}],
        },
    ],
    "rules": [
        {"repository": "team-a/*", "pull": ["alice"], "delete": ["alice"]},
        {"repository": "public/*", "anonymous_pull": True, "push": ["alice"]},
        {"repository": "shared", "pull": ["*"]},
    ],
}


def test_parse_full_document() -> None:
    p = policy.parse(DOCUMENT)
    assert p.admins == {"root"}
    assert {n: a.kind for n, a in p.accounts.items()} == {
        "alice": "user",
        "root": "user",
        "team-a-puller": "robot",
        "ci": "robot",
    }
    assert p.robot_access["ci"] == (policy.Grant("team-a/**", frozenset({"push"})),)
    assert len(p.rules) == 3


@pytest.mark.parametrize(
    ("name", "repository", "expected"),
    [
        ("root", "anything/at/all", {"pull", "push", "delete"}),  # admin
        ("alice", "team-a/api", {"pull", "delete"}),
        ("alice", "team-a/x/y", set()),  # '*' stays within one component
        ("alice", "public/tool", {"pull", "push"}),
        ("alice", "shared", {"pull"}),  # '*' in a list: every account
        ("team-a-puller", "team-a/api", {"pull"}),
        ("team-a-puller", "team-a/web", set()),
        ("team-a-puller", "public/x", {"pull"}),  # anonymous pull applies to accounts too
        ("ci", "team-a/x/y", {"pull", "push"}),  # push includes pull
        (None, "public/tool", {"pull"}),
        (None, "team-a/api", set()),
        (None, "shared", set()),  # '*' means authenticated accounts, not anonymous
        ("stranger", "team-a/api", set()),
    ],
)
def test_actions(name: str | None, repository: str, expected: set[str]) -> None:
    assert policy.parse(DOCUMENT).actions(name, repository) == expected


def test_catalog_access() -> None:
    p = policy.parse(DOCUMENT)
    assert p.catalog("alice")
    assert p.catalog(None)  # some repository allows anonymous pull
    closed = policy.parse({"rules": [{"repository": "a", "pull": ["alice"]}]})
    assert not closed.catalog(None)


def _with(**changes: Any) -> dict[str, Any]:
    return {**DOCUMENT, **changes}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected a mapping"),
        (_with(extra=1), "unknown keys"),
        (_with(version=2), "unsupported version"),
        (_with(users=[{"name": "x"}]), "missing keys"),
        (_with(users=[{"name": "x", "password_hash": "$apr1$x$y"}]), "bcrypt"),
        (_with(users=[{"name": "x", "password_hash": HASH, "pasword": 1}]), "unknown keys"),
        (_with(users=[{"name": "", "password_hash": HASH}]), "non-empty name"),
        (_with(users=[{"name": "a:b", "password_hash": HASH}]), "non-empty name"),
        (
            _with(users=[{"name": "ci", "password_hash": HASH}]),
            "used twice",
        ),  # clashes with a robot
        (_with(robots=[{"name": "r", "secret_hash": "plain"}]), "bcrypt"),
        (
            _with(
                robots=[
                    {
                        "name": "r",
                        "secret_hash": HASH,
                        "access": [{"repository": "a", "actions": ["fly"]}],
                    }
                ]
            ),
            "one of pull, push, delete",
        ),
        (
            _with(
                robots=[
                    {
                        "name": "r",
                        "secret_hash": HASH,
                        "access": [{"repository": "a", "actions": []}],
                    }
                ]
            ),
            "at least one action",
        ),
        (_with(rules=[{"pull": ["alice"]}]), "missing keys"),
        (_with(rules=[{"repository": "Team/A"}]), "invalid repository pattern"),
        (_with(rules=[{"repository": "a", "anonymous_pull": "yes"}]), "true or false"),
        (_with(rules=[{"repository": "a", "pull": "alice"}]), "expected a list"),
        (_with(rules=[{"repository": "a", "pul": ["alice"]}]), "unknown keys"),
        (_with(admins=["*"]), "not allowed"),
        (_with(rules=[{"repository": "a", "immutable_tags": ["v[0-9]"]}]), "not a tag pattern"),
        (_with(rules=[{"repository": "a", "immutable_tags": "v*"}]), "expected a list"),
        (
            _with(rules=[{"repository": "a", "retention": {"protect": ["v*"]}}]),
            "keep_last or untagged_days is required",
        ),
        (
            _with(rules=[{"repository": "a", "retention": {"untagged_days": 0}}]),
            "untagged_days: expected a number of days above 0",
        ),
        (
            _with(rules=[{"repository": "a", "retention": {"untagged_days": "7d"}}]),
            "untagged_days",
        ),
        (
            _with(rules=[{"repository": "a", "retention": {"untagged_days": 604800}}]),
            "at most 36500",
        ),
        (_with(rules=[{"repository": "a", "retention": {"untagged_days": True}}]), "untagged"),
        (_with(rules=[{"repository": "a", "retention": {"keep_last": 0}}]), "positive integer"),
        (_with(rules=[{"repository": "a", "retention": {"keep_last": True}}]), "positive integer"),
        (
            _with(rules=[{"repository": "a", "retention": {"keep_last": 1, "keep": 2}}]),
            "unknown keys",
        ),
        (_with(rules=[{"repository": "a", "quota": {"storage": "10GB"}}]), "quota.storage"),
        (_with(rules=[{"repository": "a", "quota": {"storage": -1}}]), "not a size"),
        (_with(rules=[{"repository": "a", "quota": {"tags": "many"}}]), "number of tags"),
        (_with(rules=[{"repository": "a", "quota": {"tags": True}}]), "number of tags"),
        (_with(rules=[{"repository": "a", "quota": {"bytes": 1}}]), "unknown keys"),
        (_with(rules=[{"repository": "a", "quota": "10Gi"}]), "expected a mapping"),
    ],
)
def test_invalid_documents(document: Any, message: str) -> None:
    with pytest.raises(policy.PolicyError, match=message):
        policy.parse(document)


def test_empty_policy_grants_nothing() -> None:
    p = policy.parse({})
    assert p.actions("alice", "a") == frozenset()
    assert p.actions(None, "a") == frozenset()


# --- the directory: accounts from both files, grants as intersections -----------------


def test_directory_without_policy_gives_accounts_everything() -> None:
    d = Directory.build({"bob": HASH}, None)
    assert d.permits("bob", Access.repository("any/repo", "pull", "push", "delete"))
    assert not d.permits(None, Access.repository("any/repo", "pull"))
    assert d.principal("bob").kind == "user"


def test_directory_policy_accounts_win_over_htpasswd() -> None:
    other = "$2b$05$" + "c" * 53
    d = Directory.build({"alice": other, "hank": other}, policy.parse(DOCUMENT))
    assert d.accounts["alice"].secret_hash == HASH
    assert d.accounts["hank"].secret_hash == other
    assert d.principal("root").kind == "admin"
    assert d.principal("team-a-puller").kind == "robot"
    assert d.principal(None).kind == "anonymous"


def test_grant_is_the_intersection() -> None:
    d = Directory.build({}, policy.parse(DOCUMENT))
    asked = [
        Access.repository("team-a/api", "pull", "push"),
        Access.repository("team-b/api", "pull"),
        Access.repository("public/tool", "*"),
        Access.repository("Not_Valid", "pull"),
        Access("registry", "catalog", frozenset({"*"})),
        Access("registry", "other", frozenset({"*"})),
    ]
    assert d.grant("alice", asked) == [
        Access.repository("team-a/api", "pull"),
        Access.repository("public/tool", "pull", "push"),
        CATALOG,
    ]
    assert d.grant(None, asked) == [Access.repository("public/tool", "pull"), CATALOG]
    assert d.grant("root", [Access.repository("x", "*")]) == [
        Access.repository("x", "pull", "push", "delete")
    ]


def test_tag_rules_from_every_matching_rule() -> None:
    p = policy.parse(
        {
            "rules": [
                {"repository": "team-a/*", "immutable_tags": ["v*"]},
                {
                    "repository": "team-a/api",
                    "pull": ["alice"],
                    "immutable_tags": ["release-?"],
                    "retention": {"keep_last": 3, "protect": ["stable"]},
                },
                {"repository": "**", "retention": {"keep_last": 10}},
            ]
        }
    )
    api = p.tag_rules("team-a/api")
    assert api.immutable == ("v*", "release-?")
    assert api.retention == tag_rules.Retention(10, ("stable",))  # the most generous wins
    assert p.tag_rules("team-a/web").immutable == ("v*",)
    assert p.tag_rules("other").immutable == ()
    assert p.tag_rules("other").retention == tag_rules.Retention(10, ())
    assert policy.parse({}).tag_rules("x") == tag_rules.NO_RULES


def test_retention_of_untagged_manifests() -> None:
    p = policy.parse(
        {
            "rules": [
                {"repository": "ci/*", "retention": {"untagged_days": 7}},
                {"repository": "ci/app", "retention": {"untagged_days": 1.5, "keep_last": 50}},
            ]
        }
    )
    assert p.tag_rules("ci/tool").retention == tag_rules.Retention(None, (), 7.0)
    assert p.tag_rules("ci/app").retention == tag_rules.Retention(50, (), 7.0)


def test_quotas_from_every_matching_rule_the_smallest_holds() -> None:
    p = policy.parse(
        {
            "rules": [
                {"repository": "team-a/**", "quota": {"storage": "10Gi", "tags": 1000}},
                {"repository": "team-a/big", "quota": {"storage": "1Ti"}},
                {"repository": "team-a/small", "quota": {"storage": 1000000, "tags": None}},
                {"repository": "other", "pull": ["alice"]},
            ]
        }
    )
    assert p.quota("team-a/app") == quotas.Quota(10 * 2**30, 1000)
    assert p.quota("team-a/big") == quotas.Quota(10 * 2**30, 1000)  # a rule cannot loosen
    assert p.quota("team-a/small") == quotas.Quota(1000000, 1000)
    assert p.quota("other") == quotas.NO_QUOTA == policy.parse({}).quota("x")
