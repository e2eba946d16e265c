"""Scopes, repository patterns and htpasswd parsing: pure, table-driven."""

from __future__ import annotations

import logging

import pytest

from registry_server.auth import htpasswd, scopes
from registry_server.auth.model import CATALOG, Access


def repo(name: str, *actions: str) -> Access:
    return Access.repository(name, *actions)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("repository:team-a/api:pull", repo("team-a/api", "pull")),
        ("repository:team-a/api:pull,push", repo("team-a/api", "pull", "push")),
        ("repository:a:*", repo("a", "*")),
        ("repository(plugin):a:pull", repo("a", "pull")),
        # A registry host with a port inside the name: type to the first colon, actions after
        # the last.
        ("repository:localhost:5000/a:pull", repo("localhost:5000/a", "pull")),
        ("registry:catalog:*", CATALOG),
        ("repository:a:pull,,push,", repo("a", "pull", "push")),
    ],
)
def test_parse_scope(text: str, expected: Access) -> None:
    assert scopes.parse_scope(text) == expected


@pytest.mark.parametrize(
    "text", ["", "repository", "repository:a", ":a:pull", "repository::pull", "repository:a:"]
)
def test_parse_scope_rejects(text: str) -> None:
    assert scopes.parse_scope(text) is None


def test_parse_scopes_splits_spaces_and_merges_repeats() -> None:
    found = scopes.parse_scopes(
        ["repository:a:pull repository:b:push", "repository:a:push", "junk", "registry:catalog:*"]
    )
    assert found == [repo("a", "pull", "push"), repo("b", "push"), CATALOG]


def test_requested_actions_star_means_all() -> None:
    assert scopes.requested_repository_actions(repo("a", "*")) == {"pull", "push", "delete"}
    assert scopes.requested_repository_actions(repo("a", "pull", "bogus")) == {"pull"}


def test_covers() -> None:
    granted = [repo("a", "pull"), repo("a", "push"), repo("b", "pull")]
    assert scopes.covers(granted, repo("a", "pull", "push"))
    assert not scopes.covers(granted, repo("b", "pull", "push"))
    assert not scopes.covers(granted, repo("c", "pull"))
    assert not scopes.covers([Access("registry", "a", frozenset({"pull"}))], repo("a", "pull"))
    assert scopes.covers([CATALOG], CATALOG)


def test_challenge_scope_orders_actions() -> None:
    wanted = [repo("a", "push", "pull"), CATALOG]
    assert scopes.challenge_scope(wanted) == "repository:a:pull,push registry:catalog:*"
    assert scopes.challenge_scope([]) == ""


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("team-a/api", "team-a/api", True),
        ("team-a/api", "team-a/api2", False),
        ("team-a/api", "team-a", False),
        ("team-a/*", "team-a/api", True),
        ("team-a/*", "team-a/x/y", False),
        ("team-a/*", "team-a", False),
        ("team-a/*", "team-b/api", False),
        ("team-a/**", "team-a/x/y", True),
        ("team-a/**", "team-a/api", True),
        ("**", "anything/at/all", True),
        ("*", "top", True),
        ("*", "a/b", False),
        ("team-?/api", "team-b/api", True),
        ("team-?/api", "team-bb/api", False),
        ("a.b", "aXb", False),  # dots are literal
        ("*/api", "team-a/api", True),
    ],
)
def test_patterns(pattern: str, name: str, expected: bool) -> None:
    assert scopes.matches(pattern, name) is expected


@pytest.mark.parametrize("pattern", ["", "Team/A", "a b", "a[0]", "a+b", "(x)"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(scopes.PatternError):
        scopes.compile_pattern(pattern)


BCRYPT = "$2y$05$" + "a" * 53


def test_htpasswd_parse(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(
        [
            "# comment",
            "",
            f"alice:{BCRYPT}",
            f"bob:{BCRYPT.replace('$2y$', '$2b$')}",
            "carol:$apr1$abc$def",
            "dave:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "erin:plaintext",
        ]
    )
    with caplog.at_level(logging.ERROR, "registry_server.auth"):
        users = htpasswd.parse(text, "users.htpasswd")
    assert sorted(users) == ["alice", "bob"]
    refused = [r for r in caplog.records if "only bcrypt" in r.getMessage()]
    assert [r.user for r in refused] == ["carol", "dave", "erin"]
    assert [r.hash for r in refused] == ["apr1-md5", "sha1", "plain-or-des"]
    # The log never carries the secret material.
    assert "plaintext" not in caplog.text and "$apr1$abc" not in caplog.text


@pytest.mark.parametrize("text", ["no-colon-here", f":{BCRYPT}", f"alice:{BCRYPT}\nalice:{BCRYPT}"])
def test_htpasswd_invalid_file(text: str) -> None:
    with pytest.raises(htpasswd.HtpasswdError):
        htpasswd.parse(text)
