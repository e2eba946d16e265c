"""access.plan(): Repositories, namespaces and stored robots in, policy and Secrets out.

Pure, so the decisions are pinned down here, table by table: who is granted, which
robot holds what, conflicts, and every step of a rotation. The policy is also parsed
with the registry server's own parser, so the two cannot drift apart.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from typing import Any

import pytest
import yaml

from registry_operator import access, credentials, models, robots
from registry_operator.rendering import policy as policy_files
from registry_server.auth import policy as server_policy
from registry_server.protocol import tag_rules

OWNER = models.Owner("main", "registries", "reg-uid")
HOSTS = ("localhost:5123", "main.registries.svc:5000")
TARGET = access.Target(OWNER, HOSTS, ("admin", "replicator"))
NOW = 1_800_000_000.0


def _generators() -> credentials.Generators:
    counter = itertools.count(1)
    return credentials.Generators(
        password=lambda: f"secret-{next(counter)}",
        hash=lambda secret: "$2b$05$" + secret.rjust(53, "x")[-53:],
    )


def _repo(
    name: str, path: str, created: str = "2026-01-01T00:00:00Z", **spec: Any
) -> models.Repository:
    body = {
        "metadata": {
            "name": name,
            "namespace": "registries",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
            "annotations": spec.pop("annotations", {}),
        },
        "spec": {"registryRef": {"name": "main"}, "path": path, **spec},
    }
    return models.parse_repository(body)


def _ns(name: str, terminating: bool = False, **labels: str) -> access.Namespace:
    return access.Namespace(name, labels, terminating)


def _plan(
    repositories: list[models.Repository],
    namespaces: list[access.Namespace],
    stored: dict[str, robots.Robot] | None = None,
    *,
    now: float = NOW,
    probe: access.Probe | None = None,
    target: access.Target | None = TARGET,
) -> access.Plan:
    return access.plan(
        target, repositories, namespaces, stored or {}, now, _generators(), probe, access.Settings()
    )


NAMESPACES = [
    _ns("registries"),
    _ns("team-a"),
    _ns("team-b", **{"berth.dev/pull": "team-a"}),
    _ns("team-c", **{"berth.dev/pull": "other"}),
    _ns("leaving", True, **{"berth.dev/pull": "team-a"}),
]
API = _repo(
    "team-a-api",
    "team-a/api",
    pullAccess={
        "namespaces": ["team-a"],
        "namespaceSelector": {"matchLabels": {"berth.dev/pull": "team-a"}},
        "serviceAccounts": ["default"],
    },
)


def test_grants_by_name_and_by_selector_but_not_terminating_namespaces() -> None:
    result = _plan([API], NAMESPACES)
    assert sorted(result.secrets) == [
        ("team-a", "main-registries-pull"),
        ("team-b", "main-registries-pull"),
    ]
    desired = result.secrets[("team-a", "main-registries-pull")]
    assert desired == access.Desired(
        "team-a", "main-registries-pull", "pull", "pull.team-a", ("default",), ("team-a-api",)
    )
    assert sorted(result.robots) == ["pull.team-a", "pull.team-b"]
    assert result.policy is not None
    assert [(name, access_) for name, _, access_ in result.policy.robots] == [
        ("pull.team-a.1", (("team-a/api", ("pull",)),)),
        ("pull.team-b.1", (("team-a/api", ("pull",)),)),
    ]
    assert result.policy.admins == ("admin", "replicator")
    assert result.requeue_after is None


def test_one_robot_per_namespace_covers_every_repository_granting_it() -> None:
    web = _repo("team-a-web", "team-a/web", pullAccess={"namespaces": ["team-a"]})
    result = _plan([API, web], NAMESPACES)
    assert result.policy is not None
    robots_by_name = {name: access_ for name, _, access_ in result.policy.robots}
    assert robots_by_name["pull.team-a.1"] == (
        ("team-a/api", ("pull",)),
        ("team-a/web", ("pull",)),
    )
    assert robots_by_name["pull.team-b.1"] == (("team-a/api", ("pull",)),)
    both = result.secrets[("team-a", "main-registries-pull")]
    assert both.repositories == ("team-a-api", "team-a-web")


def test_revoking_one_namespace_leaves_the_others_credentials_alone() -> None:
    first = _plan([API], NAMESPACES)
    unlabelled = [n for n in NAMESPACES if n.name != "team-b"] + [_ns("team-b")]
    second = _plan([API], unlabelled, dict(first.robots))
    assert sorted(second.secrets) == [("team-a", "main-registries-pull")]
    assert second.robots == {"pull.team-a": first.robots["pull.team-a"]}
    assert second.policy is not None
    assert [name for name, _, _ in second.policy.robots] == ["pull.team-a.1"]


def test_push_access_always_includes_the_repositorys_own_namespace() -> None:
    ci = _repo("ci", "team-a/ci", pushAccess={"namespaces": ["team-c"]})
    result = _plan([ci], NAMESPACES)
    assert sorted(result.secrets) == [
        ("registries", "main-registries-push"),
        ("team-c", "main-registries-push"),
    ]
    assert result.policy is not None
    assert {access_ for _, _, access_ in result.policy.robots} == {
        (("team-a/ci", ("pull", "push")),)
    }


def test_public_repository_allows_anonymous_pull() -> None:
    public = _repo("docs", "public/docs", visibility="public")
    result = _plan([public], NAMESPACES)
    assert result.policy is not None
    assert result.policy.rules == (access.Rule("public/docs", anonymous_pull=True),)
    assert result.secrets == {}


def test_two_claims_of_one_path_the_older_keeps_it() -> None:
    old = _repo(
        "first", "team-a/api", "2026-01-01T00:00:00Z", pullAccess={"namespaces": ["team-a"]}
    )
    new = _repo(
        "second", "team-a/api", "2026-02-01T00:00:00Z", pullAccess={"namespaces": ["team-c"]}
    )
    result = _plan([new, old], NAMESPACES)
    assert set(result.active) == {"first"}
    assert sorted(result.secrets) == [("team-a", "main-registries-pull")]
    assert "also claimed by Repository second" in result.conflicts["first"]
    assert "held by Repository first, which is older" in result.conflicts["second"]


def test_custom_secret_names_and_service_accounts_add_up() -> None:
    a = _repo("a", "x/a", pullAccess={"namespaces": ["team-a"], "serviceAccounts": ["builder"]})
    b = _repo("b", "x/b", pullAccess={"namespaces": ["team-a"], "serviceAccounts": ["default"]})
    c = _repo("c", "x/c", pullAccess={"namespaces": ["team-a"], "secretName": "special"})
    result = _plan([a, b, c], NAMESPACES)
    assert result.secrets[("team-a", "main-registries-pull")].service_accounts == (
        "builder",
        "default",
    )
    assert result.secrets[("team-a", "special")].robot == "pull.team-a"


def test_a_secret_name_wanted_for_pull_and_push_goes_to_pull() -> None:
    a = _repo("a", "x/a", pullAccess={"namespaces": ["registries"], "secretName": "same"})
    b = _repo("b", "x/b", pushAccess={"secretName": "same"})
    result = _plan([a, b], NAMESPACES)
    assert result.secrets[("registries", "same")].mode == "pull"
    assert result.secret_name_clashes == {"b": ("registries/same",)}


def test_no_registry_means_nothing_is_wanted() -> None:
    result = _plan([API], NAMESPACES, target=None)
    assert result.secrets == {}
    assert result.policy is None
    assert set(result.active) == {"team-a-api"}


def test_peers_are_admins_with_their_own_accounts() -> None:
    target = access.Target(OWNER, TARGET.hosts, TARGET.admins, peers=("peer.us.main",))
    result = _plan([], NAMESPACES, target=target)
    assert result.policy is not None
    assert result.policy.admins == ("admin", "peer.us.main.1", "replicator")
    assert [name for name, _ in result.policy.users] == ["peer.us.main.1"]


# --- rotation -----------------------------------------------------------------------------


def _rotating(annotation: str = "now", **rotation: str) -> models.Repository:
    spec: dict[str, Any] = {"pullAccess": {"namespaces": ["team-a"]}}
    if rotation:
        spec["rotation"] = rotation
    return _repo(
        "api",
        "team-a/api",
        annotations={models.ROTATE_ANNOTATION: annotation} if annotation else {},
        **spec,
    )


def _names(result: access.Plan) -> list[str]:
    assert result.policy is not None
    return [name for name, _, _ in result.policy.robots]


def test_rotation_hands_out_only_what_the_server_accepts_and_keeps_the_old_one() -> None:
    plain = _rotating(annotation="")
    start = _plan([plain], NAMESPACES)
    robot = start.robots["pull.team-a"]

    # 1. requested: a new credential joins the policy, the Secret keeps the old one.
    staged = _plan([_rotating()], NAMESPACES, dict(start.robots), now=NOW + 10)
    assert staged.rotations_handled == {"api": "now"}
    after = staged.robots["pull.team-a"]
    assert after.current == robot.current
    assert after.staged is not None and after.staged.name == "pull.team-a.2"
    assert _names(staged) == ["pull.team-a.1", "pull.team-a.2"]
    assert staged.requeue_after == pytest.approx(2.0)

    # 2. the server refuses it yet (the kubelet has not updated the file): wait.
    probe = access.Probe("pull.team-a.2", NOW + 10, access.REFUSED)
    waiting = _plan([plain], NAMESPACES, dict(staged.robots), now=NOW + 14, probe=probe)
    assert waiting.robots["pull.team-a"].current == robot.current
    assert waiting.requeue_after is not None and 2.0 <= waiting.requeue_after <= 15.0

    # 3. accepted: handed out; the old one stays valid for the overlap (default 10m).
    probe = access.Probe("pull.team-a.2", NOW + 10, access.ACCEPTED)
    promoted = _plan([plain], NAMESPACES, dict(waiting.robots), now=NOW + 20, probe=probe)
    rotated = promoted.robots["pull.team-a"]
    assert rotated.current.name == "pull.team-a.2"
    assert rotated.previous is not None and rotated.previous.name == "pull.team-a.1"
    assert rotated.previous.password == ""  # no longer needed anywhere
    assert rotated.rotated_at == NOW + 20
    assert _names(promoted) == ["pull.team-a.1", "pull.team-a.2"]
    assert promoted.requeue_after == pytest.approx(600.0)

    # 4. after the overlap the old credential leaves the policy.
    done = _plan([plain], NAMESPACES, dict(promoted.robots), now=NOW + 620)
    assert _names(done) == ["pull.team-a.2"]
    assert not done.robots["pull.team-a"].rotating


def test_unreachable_server_means_waiting_for_the_propagation_time() -> None:
    start = _plan([_rotating(annotation="")], NAMESPACES)
    staged = _plan([_rotating()], NAMESPACES, dict(start.robots), now=NOW)
    probe = access.Probe("pull.team-a.2", NOW, access.UNREACHABLE)
    early = _plan(
        [_rotating(annotation="")], NAMESPACES, dict(staged.robots), now=NOW + 60, probe=probe
    )
    assert early.robots["pull.team-a"].staged is not None
    # Asked again after the backoff (elapsed / 4), in case it was one slow answer.
    assert early.requeue_after == pytest.approx(15.0)
    near = _plan(
        [_rotating(annotation="")], NAMESPACES, dict(staged.robots), now=NOW + 110, probe=probe
    )
    assert near.requeue_after == pytest.approx(10.0)  # staged + 120 s comes first
    late = _plan(
        [_rotating(annotation="")], NAMESPACES, dict(staged.robots), now=NOW + 121, probe=probe
    )
    assert late.robots["pull.team-a"].current.name == "pull.team-a.2"


def test_interval_rotation_and_custom_overlap() -> None:
    repo = _rotating(annotation="", interval="1h", overlap="30s")
    start = _plan([repo], NAMESPACES)
    assert start.requeue_after == pytest.approx(3600.0)
    due = _plan([repo], NAMESPACES, dict(start.robots), now=NOW + 3600)
    assert due.robots["pull.team-a"].staged is not None
    probe = access.Probe("pull.team-a.2", NOW + 3600, access.ACCEPTED)
    promoted = _plan([repo], NAMESPACES, dict(due.robots), now=NOW + 3605, probe=probe)
    assert promoted.robots["pull.team-a"].previous_until == NOW + 3635


def test_probe_only_vouches_for_credentials_staged_before_it() -> None:
    staged = robots.stage(robots.new("pull.x", NOW, _generators()), NOW + 50, _generators())
    probe = access.Probe("pull.other.2", NOW + 10, access.ACCEPTED)
    repo = _repo("x", "x/x", pullAccess={"namespaces": ["x"]})
    result = _plan([repo], [_ns("x")], {"pull.x": staged}, now=NOW + 60, probe=probe)
    assert result.robots["pull.x"].staged is not None


def test_newest_staged_is_the_one_to_probe() -> None:
    gen = _generators()
    a = robots.stage(robots.new("pull.a", NOW, gen), NOW + 1, gen)
    b = robots.stage(robots.new("pull.b", NOW, gen), NOW + 5, gen)
    c = robots.new("pull.c", NOW, gen)
    assert access.newest_staged({"pull.a": a, "pull.b": b, "pull.c": c}) == b
    assert access.newest_staged({"pull.c": c}) is None


def test_robots_survive_storage_round_trip() -> None:
    gen = _generators()
    robot = robots.promote(robots.stage(robots.new("pull.a", NOW, gen), NOW + 1, gen), NOW + 2, 60)
    assert robots.load("pull.a", robots.dump(robot)) == robot
    assert robots.load("pull.a", "not json") is None
    assert robots.load("pull.a", '{"generation": 1}') is None


# --- the rendered policy is what the server accepts ---------------------------------------


def _server_view(policy: access.Policy, shards: int = 1) -> server_policy.Policy:
    """What the server makes of the rendered main file and shards (digests checked)."""
    rendered = policy_files.Rendered(
        policy_files.shards(policy, shards),
        "",
    )
    main, refs = server_policy.parse_main(
        yaml.safe_load(policy_files.main_text(OWNER, policy, rendered.shards))
    )
    assert [r.file for r in refs] == [f"policy-{i}.json.gz" for i in range(shards)]
    parts = [("main", main)]
    for ref, data in zip(refs, rendered.shards, strict=True):
        assert ref.sha256 == hashlib.sha256(data).hexdigest()
        parts.append((ref.file, server_policy.parse(json.loads(gzip.decompress(data)))))
    return server_policy.merge(parts)


def test_rendered_policy_means_the_same_to_the_server() -> None:
    gen = credentials.Generators(password=lambda: "s3cret", hash=robots.hash_secret)
    public = _repo("docs", "public/docs", visibility="public")
    ci = _repo("ci", "team-a/ci", pushAccess={})
    target = access.Target(OWNER, TARGET.hosts, TARGET.admins, peers=("peer.us.main",))
    result = access.plan(target, [API, public, ci], NAMESPACES, {}, NOW, gen)
    assert result.policy is not None
    parsed = _server_view(result.policy)
    assert parsed.actions("pull.team-a.1", "team-a/api") == {"pull"}
    assert parsed.actions("pull.team-a.1", "team-b/web") == frozenset()
    assert parsed.actions("push.registries.1", "team-a/ci") == {"pull", "push"}
    assert parsed.actions(None, "public/docs") == {"pull"}
    assert parsed.actions(None, "team-a/api") == frozenset()
    assert parsed.actions("replicator", "anything/at/all") == {"pull", "push", "delete"}
    assert "peer.us.main.1" in parsed.admins
    assert parsed.accounts["peer.us.main.1"].kind == "user"


def test_tag_rules_reach_the_server_policy_and_the_status() -> None:
    gen = credentials.Generators(password=lambda: "s3cret", hash=robots.hash_secret)
    strict = _repo(
        "api",
        "team-a/api",
        immutableTags=["v*"],
        retention={"keepLast": 5, "protect": ["stable"]},
    )
    loose = _repo("web", "team-a/web", retention={"protect": ["stable"]})
    ci = _repo("ci", "team-a/ci", retention={"untaggedDays": 7})
    result = access.plan(TARGET, [strict, loose, ci], NAMESPACES, {}, NOW, gen)
    assert result.policy is not None
    assert result.policy.rules == (
        access.Rule("team-a/api", immutable_tags=("v*",), keep_last=5, protect=("stable",)),
        access.Rule("team-a/ci", untagged_days=7),
    )
    parsed = _server_view(result.policy, shards=4)
    rules = parsed.tag_rules("team-a/api")
    assert rules.is_immutable("v1") and not rules.is_immutable("latest")
    assert rules.retention is not None and rules.retention.keep_last == 5
    assert rules.retention.untagged_days is None
    assert parsed.tag_rules("team-a/web").retention is None
    ci_rules = parsed.tag_rules("team-a/ci").retention
    assert ci_rules is not None and (ci_rules.keep_last, ci_rules.untagged_days) == (None, 7.0)
    written = access.Written(frozenset(), {})

    def condition(repository: models.Repository) -> tuple[str, str, str]:
        _, found = access.repository_status(repository, TARGET, result, written)
        (c,) = [c for c in found if c.type == access.TAG_RULES]
        return c.status, c.reason, c.message

    assert condition(strict) == (
        "True",
        "InPolicy",
        "immutable tags v*; retention keeps the last 5 tags and tags matching stable",
    )
    assert condition(loose)[:2] == ("False", "NothingToEnforce")


def test_dockerconfigjson_is_keyed_by_every_registry_host() -> None:
    credential = robots.Credential("pull.team-a.1", "h", NOW, "pw")
    config = access.dockerconfigjson(
        ("localhost:5123", "registry.example.com", "main.registries.svc:5000"), credential
    )
    assert list(config["auths"]) == [
        "localhost:5123",
        "registry.example.com",
        "main.registries.svc:5000",
    ]
    for entry in config["auths"].values():
        assert entry["username"] == "pull.team-a.1"
        assert entry["password"] == "pw"
        assert entry["auth"] == "cHVsbC50ZWFtLWEuMTpwdw=="  # base64 of user:password


@pytest.mark.parametrize(
    "pattern", ["v*", "release-?", "1.2.*", "a_b", "", "release/*", "v[0-9]", "x" * 129, "é"]
)
def test_operator_and_server_agree_on_tag_patterns(pattern: str) -> None:
    """The operator cannot import the server (layers), so it keeps its own copy of the tag
    pattern grammar: both must accept and refuse the same patterns."""
    try:
        tag_rules.validate_pattern(pattern)
        server_accepts = True
    except tag_rules.TagPatternError:
        server_accepts = False
    try:
        _repo("api", "team-a/api", immutableTags=[pattern])
        operator_accepts = True
    except models.InvalidSpec:
        operator_accepts = False
    assert operator_accepts == server_accepts
