"""rendering.policy: the policy split into shard Secrets and a main file (pure).

The server's own parser reads what is rendered (digests checked), so a split policy
means exactly what one file would: whatever the shard count, every robot may do the
same on every path.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json

import pytest
import yaml

from registry_operator import access, models, robots
from registry_operator.rendering import names
from registry_operator.rendering import policy as rp
from registry_server.auth import policy as server_policy

OWNER = models.Owner("main", "registries", "reg-uid")
HASH = "$2b$05$" + "h" * 53


def make(repositories: int, tenants: int = 10, rules: int = 0) -> access.Policy:
    """`repositories` paths, each granted to two of `tenants` namespaces' robots."""
    grants: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for i in range(repositories):
        team = i % tenants
        for k in (0, 3):
            robot = f"pull.tenant-{(team + k) % tenants}.1"
            grants.setdefault(robot, []).append((f"team-{team}/svc-{i}", robots.ACTIONS["pull"]))
    return access.Policy(
        admins=("admin", "replicator"),
        users=(("peer.us.main.1", HASH),),
        robots=tuple(sorted((name, HASH, tuple(sorted(g))) for name, g in grants.items())),
        rules=tuple(access.Rule(f"team-0/svc-{i * 10}", anonymous_pull=True) for i in range(rules)),
    )


def server_view(rendered: rp.Rendered) -> server_policy.Policy:
    main, refs = server_policy.parse_main(yaml.safe_load(rendered.main))
    parts = [("main", main)]
    for ref, data in zip(refs, rendered.shards, strict=True):
        assert ref.sha256 == hashlib.sha256(data).hexdigest()
        parts.append((ref.file, server_policy.parse(json.loads(gzip.decompress(data)))))
    return server_policy.merge(parts)


def test_a_small_policy_is_one_shard_and_means_what_it_says() -> None:
    policy = make(40, rules=2)
    rendered = rp.render(OWNER, policy)
    assert len(rendered.shards) == 1
    view = server_view(rendered)
    assert view.admins == {"admin", "replicator"}
    assert view.accounts["peer.us.main.1"].kind == "user"
    for name, _, grants in policy.robots:
        for path, _ in grants:
            assert view.actions(name, path) == {"pull"}
    assert view.actions("pull.tenant-1.1", "team-0/svc-20") == frozenset()
    assert view.actions(None, "team-0/svc-10") == {"pull"}


def test_rendering_is_deterministic() -> None:
    policy = make(200)
    assert rp.render(OWNER, policy) == rp.render(OWNER, policy)


def test_the_shard_count_doubles_until_each_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make(3000, tenants=40, rules=20)
    one = rp.render(OWNER, policy)
    limit = max(one.sizes) // 5
    monkeypatch.setattr(rp, "SHARD_BYTES", limit)
    split = rp.render(OWNER, policy)
    count = len(split.shards)
    assert count >= 8 and count & (count - 1) == 0  # doubled: 1 -> 2 -> 4 -> 8 ...
    assert max(rp.shards(policy, count // 2), key=len).__len__() > limit
    assert max(split.sizes) <= limit
    whole, parts = server_view(one), server_view(split)
    assert parts.admins == whole.admins and dict(parts.accounts) == dict(whole.accounts)
    for name, _, grants in policy.robots:
        for path, _ in grants[:50]:
            assert parts.actions(name, path) == whole.actions(name, path) == {"pull"}
    assert len(parts.rules) == len(whole.rules) == 20
    # The count is kept from the previous rendering, and only halved when far too small.
    assert len(rp.render(OWNER, policy, previous=count).shards) == count
    monkeypatch.setattr(rp, "SHARD_BYTES", max(one.sizes) * 20)
    assert len(rp.render(OWNER, policy, previous=count).shards) == 1


def test_one_more_repository_changes_one_or_two_shards() -> None:
    before = make(2000, tenants=20)
    after = make(2001, tenants=20)
    old, new = rp.shards(before, 16), rp.shards(after, 16)
    changed = [i for i in range(16) if old[i] != new[i]]
    assert 1 <= len(changed) <= 2  # its two grants, placed by path and robot


def test_secrets_are_written_shards_first_and_the_main_file_announces_their_count() -> None:
    rendered = rp.render(OWNER, make(10))
    secrets = rp.secrets(OWNER, rendered)
    assert [s["metadata"]["name"] for s in secrets] == ["main-policy-0", "main-policy"]
    main = secrets[-1]
    assert rp.shard_count(main) == 1
    assert main["metadata"]["labels"][names.COMPONENT_LABEL] == "policy"
    shard = secrets[0]
    assert base64.b64decode(shard["data"]["policy-0.json.gz"]) == rendered.shards[0]
    assert shard["metadata"]["ownerReferences"][0]["uid"] == "reg-uid"
    assert rp.shard_count(None) == 1


@pytest.mark.parametrize(("count", "slots"), [(1, 8), (8, 8), (9, 16), (17, 32)])
def test_slots_grow_in_powers_of_two(count: int, slots: int) -> None:
    assert rp.slots(count) == slots


def _stored(rendered: rp.Rendered) -> dict[str, dict[str, object]]:
    return {str(s["metadata"]["name"]): s for s in rp.secrets(OWNER, rendered)}


def test_the_stored_policy_reads_back() -> None:
    policy = make(30, rules=2)
    stored = rp.read_stored(_stored(rp.render(OWNER, policy)), "main")
    for name, secret_hash, grants in policy.robots:
        assert stored.accounts[name] == secret_hash
        assert {(name, path) for path, _ in grants} <= stored.grants
    assert stored.rules == set(policy.rules)
    assert rp.read_stored({}, "main") == access.Stored()


def test_every_field_of_a_rule_reads_back() -> None:
    """A rule read back unlike it was written counts as not in force (found by review:
    untagged_days was not read, so each such Repository was told its rule was not)."""
    rule = access.Rule(
        "team-0/app",
        anonymous_pull=True,
        immutable_tags=("v*",),
        keep_last=5,
        protect=("stable",),
        untagged_days=14,
        quota_storage=1 << 30,
        quota_tags=100,
    )
    policy = dataclasses.replace(make(3), rules=(rule,))
    assert rp.read_stored(_stored(rp.render(OWNER, policy)), "main").rules == {rule}


def test_a_shard_not_matching_the_main_file_counts_as_absent() -> None:
    found = _stored(rp.render(OWNER, make(30)))
    other = rp.secrets(OWNER, rp.render(OWNER, make(31)))[0]
    found["main-policy-0"] = other
    assert rp.read_stored(found, "main").grants == frozenset()


def test_a_single_file_policy_of_an_older_operator_reads_back() -> None:
    text = json.dumps(
        {
            "admins": ["admin"],
            "robots": [
                {
                    "name": "pull.a.1",
                    "secret_hash": HASH,
                    "access": [{"repository": "a/x", "actions": ["pull"]}],
                }
            ],
        }
    )
    old = {"main-policy": {"data": {"policy.yaml": base64.b64encode(text.encode()).decode()}}}
    stored = rp.read_stored(old, "main")
    assert stored.accounts == {"pull.a.1": HASH} and stored.grants == {("pull.a.1", "a/x")}
