"""Repository path patterns: the server's grammar, overlap of two patterns, and what a
Repository granting a pattern becomes (pure)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from registry_operator import access, credentials, models, patterns, robots
from registry_operator.rendering import policy as policy_files
from registry_server.auth import scopes
from tests.registry_operator.test_policy_shards import server_view

OWNER = models.Owner("main", "registries", "reg-uid")
TARGET = access.Target(OWNER, ("localhost:5123",), ("admin",))


def test_matching_is_the_servers() -> None:
    rng = random.Random(18)
    names = ["team-a", "team-a/api", "team-a/x/api", "team-b/api", "t/a/b/c", "team-ab/api"]
    pieces = ["team-a", "team-?", "*", "**", "api", "a*", "x", "team-*"]
    for _ in range(300):
        pattern = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
        for name in names:
            assert patterns.matches(pattern, name) == scopes.matches(pattern, name), (
                pattern,
                name,
            )


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("team-a/*", "team-a/api", True),
        ("team-a/*", "team-a/x/api", False),
        ("team-a/**", "team-a/x/api", True),
        ("team-a/*", "team-b/*", False),
        ("team-*", "team-a/*", False),  # one component against two
        ("**", "anything/at/all", True),
        ("a/*b", "a/c*", True),  # a/cb
        ("a/?", "a/xy", False),
        ("*/x", "y/*", True),  # y/x
        ("a/*/b", "a/**", True),
        ("team-a/api", "team-a/api", True),
        ("team-a/api", "team-a/web", False),
    ],
)
def test_overlap(a: str, b: str, expected: bool) -> None:
    assert patterns.overlap(a, b) is expected
    assert patterns.overlap(b, a) is expected


def test_overlap_agrees_with_every_short_name() -> None:
    """Against brute force: every name of up to 6 characters over a, b and '/'."""
    alphabet = "ab/"
    names = ["".join(p) for n in range(7) for p in itertools.product(alphabet, repeat=n)]
    tokens = ["a", "b", "/", "*", "?", "**"]
    rng = random.Random(7)
    for _ in range(400):
        a = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 3)))
        b = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 3)))
        witness = any(
            scopes.compile_pattern(a).match(n) and scopes.compile_pattern(b).match(n) for n in names
        )
        assert patterns.overlap(a, b) is witness, (a, b)


def _repo(name: str, path: str, created: str, **spec: Any) -> models.Repository:
    return models.parse_repository(
        {
            "metadata": {
                "name": name,
                "namespace": "registries",
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": {"registryRef": {"name": "main"}, "path": path, **spec},
        }
    )


def test_a_pattern_is_a_valid_path_and_nonsense_is_not() -> None:
    assert _repo("all", "team-a/**", "2026-01-01T00:00:00Z").path == "team-a/**"
    for bad in ("team-a/", "Team/*", "a//b", "team a/*"):
        with pytest.raises(models.InvalidSpec, match="pattern"):
            _repo("bad", bad, "2026-01-01T00:00:00Z")


def test_overlapping_claims_the_older_keeps_and_both_are_told() -> None:
    team = _repo("team", "team-a/*", "2026-01-01T00:00:00Z")
    api = _repo("api", "team-a/api", "2026-02-01T00:00:00Z")
    deep = _repo("deep", "team-a/x/api", "2026-02-01T00:00:00Z")  # not in team-a/*
    other = _repo("other", "team-b/**", "2026-03-01T00:00:00Z")
    everything = _repo("everything", "**", "2026-04-01T00:00:00Z")
    active, conflicts = access.holders([everything, other, deep, api, team])
    assert sorted(active) == ["deep", "other", "team"]
    assert conflicts["api"] == (
        "path team-a/api overlaps team-a/*, held by Repository team, which is older; "
        "this Repository grants nothing until one of them changes"
    )
    assert conflicts["team"] == (
        "path team-a/* is also claimed by Repository api (team-a/api), Repository everything"
        " (**) (newer); this Repository keeps it"
    )
    assert "held by Repository team" in conflicts["everything"]  # the oldest it overlaps
    assert "deep" not in conflicts and "other" not in conflicts
    # An exact path first, a pattern over it later: the pattern grants nothing.
    first = _repo("first", "team-c/api", "2026-01-01T00:00:00Z")
    later = _repo("later", "team-c/*", "2026-02-01T00:00:00Z")
    active, conflicts = access.holders([later, first])
    assert list(active) == ["first"]
    assert "path team-c/* overlaps team-c/api, held by Repository first" in conflicts["later"]


def test_a_pattern_grants_every_repository_it_names() -> None:
    gen = credentials.Generators(password=lambda: "s3cret", hash=robots.hash_secret)
    team = _repo(
        "team",
        "team-a/**",
        "2026-01-01T00:00:00Z",
        pullAccess={"namespaces": ["team-a"]},
        immutableTags=["v*"],
    )
    namespaces = [access.Namespace("registries", {}), access.Namespace("team-a", {})]
    result = access.plan(TARGET, [team], namespaces, {}, 1_800_000_000.0, gen)
    assert result.policy is not None
    view = server_view(policy_files.render(OWNER, result.policy))
    assert view.actions("pull.team-a.1", "team-a/api") == {"pull"}
    assert view.actions("pull.team-a.1", "team-a/x/y") == {"pull"}
    assert view.actions("pull.team-a.1", "team-b/api") == frozenset()
    assert view.tag_rules("team-a/any").is_immutable("v1")
    assert result.secrets[("team-a", "main-registries-pull")].repositories == ("team",)


def test_equal_paths_without_patterns_are_told_as_before() -> None:
    a = _repo("a", "team/x", "2026-01-01T00:00:00Z")
    b = _repo("b", "team/x", "2026-02-01T00:00:00Z")
    c = _repo("c", "team/x", "2026-03-01T00:00:00Z")
    active, conflicts = access.holders([c, b, a])
    assert list(active) == ["a"]
    assert conflicts["a"] == (
        "path team/x is also claimed by Repository b, c (newer); this Repository keeps it"
    )
    assert conflicts["c"] == (
        "path team/x is held by Repository a, which is older; "
        "this Repository grants nothing until one of them changes"
    )
