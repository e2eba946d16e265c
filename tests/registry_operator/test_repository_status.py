"""A Repository's status, piece by piece: what was granted, then each condition (by table).

access.repository_status composes these; test_access_plan pins the whole, this file
each decision on its own.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import access, models, robots
from registry_operator.status import Condition

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _repo(name: str = "api", **spec: Any) -> models.Repository:
    return models.parse_repository(
        {
            "metadata": {
                "name": name,
                "namespace": "registries",
                "uid": f"uid-{name}",
                "generation": 3,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"registryRef": {"name": "main"}, "path": f"team-a/{name}", **spec},
        }
    )


def _robot(key: str, *, staged: bool = False, previous_until: float | None = None) -> robots.Robot:
    def credential(generation: int, created: float) -> robots.Credential:
        return robots.Credential(f"{key}.{generation}", "hash", created, "pw")

    return robots.Robot(
        key=key,
        generation=2,
        current=credential(1, NOW - 100),
        staged=credential(2, NOW) if staged else None,
        staged_at=NOW if staged else None,
        previous=credential(0, NOW - 200) if previous_until is not None else None,
        previous_until=previous_until,
        rotated_at=NOW - 50 if previous_until is not None else None,
    )


def _desired(namespace: str, mode: str, *repositories: str) -> access.Desired:
    return access.Desired(
        namespace, f"main-{mode}", mode, robots.robot_key(mode, namespace), (), repositories
    )


def _plan(
    secrets: list[access.Desired],
    robots_: list[robots.Robot],
    clashes: dict[str, tuple[str, ...]] | None = None,
) -> access.Plan:
    return access.Plan(
        robots={r.key: r for r in robots_},
        policy=None,
        secrets={(d.namespace, d.name): d for d in secrets},
        active={},
        conflicts={},
        secret_name_clashes=clashes or {},
        rotations_handled={},
        requeue_after=None,
        secrets_of={
            name: tuple(sorted((d.namespace, d.name) for d in secrets if name in d.repositories))
            for name in {n for d in secrets for n in d.repositories}
        },
    )


# --- what was granted -------------------------------------------------------------------------


def test_granted_counts_only_the_secrets_written_for_this_repository() -> None:
    plan = _plan(
        [
            _desired("team-b", "pull", "api"),
            _desired("team-a", "pull", "api", "web"),
            _desired("team-a", "push", "api"),
            _desired("team-c", "pull", "web"),  # another Repository's
            _desired("team-d", "pull", "api"),  # not written
        ],
        [
            _robot("pull.team-a"),
            _robot("pull.team-b", staged=True),
            _robot("push.team-a", previous_until=NOW + 600),
            _robot("pull.team-c", previous_until=NOW + 900),
        ],
    )
    written = access.Written(
        secrets=frozenset(
            {
                ("team-a", "main-pull"),
                ("team-a", "main-push"),
                ("team-b", "main-pull"),
                ("team-c", "main-pull"),
            }
        ),
        foreign={},
    )
    done = access.granted(_repo(), plan, written)
    assert done.namespaces == {"pull": ("team-a", "team-b"), "push": ("team-a",)}
    assert done.rotated_at == NOW - 50  # push.team-a's rotation, later than any creation
    # In the order of the Secrets (namespace, name); pull.team-c is web's alone.
    assert [r.key for r in done.rotating] == ["push.team-a", "pull.team-b"]
    assert done.problems == () and done.missing == ()


def test_granted_tells_the_problems_and_missing_accounts_of_its_own_secrets() -> None:
    plan = _plan(
        [_desired("team-a", "pull", "api"), _desired("team-c", "pull", "web")],
        [],
        clashes={"api": ("team-b/main-push",)},
    )
    written = access.Written(
        secrets=frozenset(),
        foreign={("team-a", "main-pull"): "not ours", ("team-c", "main-pull"): "not ours"},
        missing_service_accounts={
            ("team-a", "main-pull"): ("builder", "default"),
            ("team-c", "main-pull"): ("default",),
        },
    )
    done = access.granted(_repo(), plan, written)
    assert done.problems == (
        "Secret team-a/main-pull: not ours",
        "Secret team-b/main-push is wanted for pull by another Repository; "
        "push access there is not written",
    )
    assert done.missing == (
        "ServiceAccount team-a/builder does not exist yet",
        "ServiceAccount team-a/default does not exist yet",
    )
    assert done.rotated_at is None and done.rotating == ()


# --- the conditions ---------------------------------------------------------------------------


def _done(pull: int = 0, push: int = 0, problems: int = 0, missing: int = 0) -> access.Granted:
    return access.Granted(
        namespaces={
            "pull": tuple(f"p{i}" for i in range(pull)),
            "push": tuple(f"q{i}" for i in range(push)),
        },
        rotated_at=None,
        rotating=(),
        problems=tuple(f"problem {i}" for i in range(problems)),
        missing=tuple(f"missing {i}" for i in range(missing)),
    )


GONE = ("RegistryNotFound", "Registry registries/main does not exist")


@pytest.mark.parametrize(
    ("unavailable", "conflict", "holds", "done", "expected"),
    [
        (GONE, None, True, _done(2, 1), ("False", *GONE)),
        (GONE, "held by web", False, _done(problems=1), ("False", *GONE)),
        (None, "held by web", False, _done(problems=1), ("False", "PathConflict", "held by web")),
        (None, None, False, _done(), ("False", "PathConflict", "")),
        (
            None,
            None,
            True,
            _done(1, problems=7, missing=1),
            ("False", "SecretConflict", "; ".join(f"problem {i}" for i in range(5))),
        ),
        (
            None,
            "also claimed by web",
            True,
            _done(2, 1),
            ("True", "Granted", "pull Secrets in 2 namespaces, push Secrets in 1"),
        ),
        (
            None,
            None,
            True,
            _done(0, 0, missing=6),
            (
                "True",
                "Granted",
                "pull Secrets in 0 namespaces, push Secrets in 0; "
                + "; ".join(f"missing {i}" for i in range(5)),
            ),
        ),
    ],
)
def test_ready_condition(
    unavailable: tuple[str, str] | None,
    conflict: str | None,
    holds: bool,
    done: access.Granted,
    expected: tuple[str, str, str],
) -> None:
    assert access.ready_condition(unavailable, conflict, holds, done) == Condition(
        access.READY, *expected
    )


@pytest.mark.parametrize(
    ("conflict", "holds", "expected"),
    [
        (None, True, ("False", "NoConflict", "")),
        (None, False, ("False", "NoConflict", "")),
        ("also claimed by web", True, ("True", "KeepsPath", "also claimed by web")),
        ("held by web", False, ("True", "PathHeldByOther", "held by web")),
    ],
)
def test_path_conflict_condition(
    conflict: str | None, holds: bool, expected: tuple[str, str, str]
) -> None:
    assert access.path_conflict_condition(conflict, holds) == Condition(
        access.PATH_CONFLICT, *expected
    )


@pytest.mark.parametrize(
    ("rotating", "expected"),
    [
        ([], ("False", "Idle", "")),
        (
            [_robot("pull.a", staged=True), _robot("pull.b", previous_until=NOW)],
            (
                "True",
                "WaitingForServer",
                "new credentials for 1 robots wait until the registry server accepts them "
                "before they are handed out",
            ),
        ),
        (
            [_robot("pull.a", previous_until=NOW + 59.9), _robot("pull.b", previous_until=NOW)],
            (
                "True",
                "OldCredentialsValid",
                "new credentials are handed out; the old ones stay valid until "
                "2027-01-15T08:00:59Z",
            ),
        ),
    ],
)
def test_rotating_condition(rotating: list[robots.Robot], expected: tuple[str, str, str]) -> None:
    assert access.rotating_condition(rotating) == Condition(access.ROTATING, *expected)


NOT_IN_POLICY = (
    "False",
    "NotInPolicy",
    "not enforced: another Repository holds the path or the Registry is missing",
)


@pytest.mark.parametrize(
    ("spec", "enforced", "expected"),
    [
        ({}, True, None),
        ({}, False, None),
        (
            {"immutableTags": ["v*", "release-*"]},
            True,
            ("True", "InPolicy", "immutable tags v*, release-*"),
        ),
        ({"immutableTags": ["v*"]}, False, NOT_IN_POLICY),
        (
            {"retention": {"keepLast": 3}},
            True,
            ("True", "InPolicy", "retention keeps the last 3 tags"),
        ),
        (
            {"immutableTags": ["v*"], "retention": {"keepLast": 3, "protect": ["stable", "lts-*"]}},
            True,
            (
                "True",
                "InPolicy",
                "immutable tags v*; retention keeps the last 3 tags and tags matching "
                "stable, lts-*",
            ),
        ),
        ({"retention": {"keepLast": 3}}, False, NOT_IN_POLICY),
        (
            {"retention": {"untaggedDays": 14}},
            True,
            ("True", "InPolicy", "untagged manifests go after 14 days"),
        ),
        (
            {"retention": {"protect": ["stable"]}},
            True,
            (
                "False",
                "NothingToEnforce",
                "retention without keepLast or untaggedDays keeps everything; protect has no"
                " effect alone",
            ),
        ),
    ],
)
def test_tag_rules_condition(
    spec: dict[str, Any], enforced: bool, expected: tuple[str, str, str] | None
) -> None:
    found = access.tag_rules_condition(_repo(**spec), enforced)
    assert found == (None if expected is None else Condition(access.TAG_RULES, *expected))
