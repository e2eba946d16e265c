"""``registry:replication:*`` (peers' state and the status the operator copies) is for admins."""

from __future__ import annotations

from registry_server.auth import policy
from registry_server.auth.directory import Directory
from registry_server.auth.model import REPLICATION, Access
from registry_server.auth.scopes import parse_scopes

HASH = "$2b$05$" + "b" * 53
DOC = {
    "admins": ["replicator"],
    "users": [
        {"name": "replicator", "password_hash": HASH},
        {"name": "alice", "password_hash": HASH},
    ],
    "rules": [{"repository": "**", "pull": ["alice"], "push": ["alice"], "delete": ["alice"]}],
}


def test_only_admins_may_replicate() -> None:
    d = Directory.build({}, policy.parse(DOC))
    assert d.permits("replicator", REPLICATION)
    assert not d.permits("alice", REPLICATION)  # every repository right is not admin
    assert not d.permits(None, REPLICATION)


def test_token_grant_includes_replication_for_admins_only() -> None:
    d = Directory.build({}, policy.parse(DOC))
    asked = parse_scopes(["registry:replication:* repository:a/b:pull"])
    assert REPLICATION in d.grant("replicator", asked)
    assert d.grant("alice", asked) == [Access("repository", "a/b", frozenset({"pull"}))]


def test_without_a_policy_file_every_account_may_replicate() -> None:
    d = Directory.build({"bob": HASH}, None)
    assert d.permits("bob", REPLICATION)
    assert not d.permits(None, REPLICATION)
