"""Repository status from the server's usage: `status.usage`, QuotaExceeded, and when
the figures count as changed (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import access, models, usage
from registry_operator.rendering import policy
from registry_operator.status import Condition

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _repo(path: str = "team-a/api", **spec: Any) -> models.Repository:
    return models.parse_repository(
        {
            "metadata": {"name": "api", "namespace": "registries", "uid": "u"},
            "spec": {"registryRef": {"name": "main"}, "path": path, **spec},
        }
    )


def _entry(name: str, storage: int, tags: int = 1, manifests: int = 1) -> dict[str, Any]:
    return {"repository": name, "storage": storage, "tags": tags, "manifests": manifests}


SERVED = [
    _entry("team-a/api", 3 * 2**20, 4, 5),
    _entry("team-a/web", 1536, 2, 2),
    _entry("team-b/db", 10, 1, 1),
]


def test_figures_keep_their_time_until_they_change() -> None:
    first = usage.observe(SERVED, None, NOW)
    again = usage.observe(SERVED, first, NOW + 30)
    assert again == first  # nothing changed: no status write
    moved = usage.observe([_entry("team-a/api", 1), *SERVED[1:]], again, NOW + 60)
    assert moved.repositories["team-a/api"][1] == NOW + 60
    assert moved.repositories["team-a/web"][1] == NOW
    broken = usage.observe([{"repository": "x"}, {"storage": 1}, *SERVED], None, NOW)
    assert sorted(broken.repositories) == ["team-a/api", "team-a/web", "team-b/db"]


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0"), (1023, "1023"), (1024, "1Ki"), (1536, "1.5Ki"), (3 * 2**20, "3Mi"),
     (int(1.99 * 2**30), "1.9Gi"), (5 * 2**40, "5Ti")],
)  # fmt: skip
def test_quantities_never_read_as_more_than_is_stored(size: int, shown: str) -> None:
    assert usage.quantity(size) == shown


def test_status_fields_of_a_path_and_of_a_pattern() -> None:
    observed = usage.observe(SERVED, None, NOW)
    assert usage.status_fields("team-a/api", observed) == {
        "usage": {
            "storage": "3Mi",
            "storageBytes": 3 * 2**20,
            "tags": 4,
            "manifests": 5,
            "updated": "2027-01-15T08:00:00Z",
        }
    }
    pattern = usage.status_fields("team-a/*", observed)["usage"]
    assert pattern["storageBytes"] == 3 * 2**20 + 1536 and pattern["repositories"] == 2
    assert pattern["tags"] == 6 and pattern["manifests"] == 7
    empty = usage.status_fields("team-c/*", observed)["usage"]
    assert empty == {
        "storage": "0",
        "storageBytes": 0,
        "tags": 0,
        "manifests": 0,
        "repositories": 0,
    }
    assert usage.status_fields("team-a/api", None) == {}
    assert usage.status_fields("team-a/api", usage.Observation(error="down")) == {}


@pytest.mark.parametrize(
    ("path", "quota", "expected"),
    [
        ("team-a/api", None, None),
        ("team-a/api", {"storage": "4Mi"}, ("False", "WithinQuota", "storage 3Mi of 4Mi")),
        (
            "team-a/api",
            {"storage": "3Mi", "tags": 10},
            ("True", "StorageQuotaReached",
             "team-a/api stores 3Mi of its 3Mi quota: pushes that add to it are refused"),
        ),
        (
            "team-a/*",
            {"tags": 2},
            ("True", "TagQuotaReached", "team-a/api has 4 of its 2 tags: new tags are refused"),
        ),
        ("team-a/*", {"tags": 5}, ("False", "WithinQuota", "tags 4 of 5")),
    ],
)  # fmt: skip
def test_quota_condition(
    path: str, quota: dict[str, Any] | None, expected: tuple[str, str, str] | None
) -> None:
    repository = _repo(path, **({"quota": quota} if quota else {}))
    found = usage.quota_condition(repository, usage.observe(SERVED, None, NOW))
    assert found == (None if expected is None else Condition(usage.QUOTA_EXCEEDED, *expected))


def test_quota_unknown_until_the_server_answers() -> None:
    repository = _repo(quota={"storage": "1Gi"})
    assert usage.quota_condition(repository, None) == Condition(
        usage.QUOTA_EXCEEDED, "Unknown", "UsageUnknown", "not read yet"
    )
    assert usage.quota_condition(repository, usage.Observation(error="GET x answered 401")) == (
        Condition(usage.QUOTA_EXCEEDED, "Unknown", "UsageUnknown", "GET x answered 401")
    )


def test_the_quota_is_rendered_into_the_policy_and_read_back() -> None:
    rule = access._rule(_repo(quota={"storage": "10Gi", "tags": 7}))
    assert rule.quota_storage == 10 * 2**30 and rule.quota_tags == 7
    document = policy._rule(rule)
    assert document["quota"] == {"storage": 10 * 2**30, "tags": 7}
    assert policy._stored([{"rules": [document]}]).rules == frozenset({rule})
    assert "quota" not in policy._rule(access._rule(_repo(visibility="public")))
    assert access._has_rule(_repo(quota={"tags": 1}))


def test_patterns_match_within_their_first_component_and_across_it() -> None:
    observed = usage.observe(
        [*SERVED, _entry("team-a/x/deep", 7), _entry("api", 1), _entry("team-b/api", 2)],
        None,
        NOW,
    )
    names = lambda path: sorted(n for n, _, _ in usage.matched(path, observed))  # noqa: E731
    assert names("team-a/*") == ["team-a/api", "team-a/web"]
    assert names("team-a/**") == ["team-a/api", "team-a/web", "team-a/x/deep"]
    assert names("*/api") == ["team-a/api", "team-b/api"]
    assert names("team-?/api") == ["team-a/api", "team-b/api"]
    assert names("api") == ["api"] and names("nope/*") == []
