"""granting.Interest.of: which namespace events concern a registry's access (by table)."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import granting, models


def _repo(name: str, namespace: str = "registries", **spec: Any) -> models.Repository:
    return models.parse_repository(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "spec": {"registryRef": {"name": "main"}, "path": f"team/{name}", **spec},
        }
    )


SELECTOR = {"namespaceSelector": {"matchLabels": {"pull": "yes"}}}
PULL = _repo("api", pullAccess={"namespaces": ["team-a", "team-b"], **SELECTOR})
PUSH = _repo("web", "builders", pushAccess={"namespaces": ["ci"]})


@pytest.mark.parametrize(
    ("active", "holding", "namespace", "labels", "concerns"),
    [
        ([], [], "team-a", {}, False),
        ([PULL], [], "team-a", {}, True),
        ([PULL], [], "team-c", {}, False),
        ([PULL], [], "team-c", {"pull": "yes"}, True),  # by the selector
        ([PULL], [], "team-c", None, False),  # labels unknown: only names count
        ([PUSH], [], "ci", {}, True),
        ([PUSH], [], "builders", {}, True),  # push access always covers its own namespace
        ([PULL], [], "registries", {}, False),  # pull access does not
        ([], [("old", "main-registries-pull")], "old", None, True),  # holds a Secret there
        ([PULL, PUSH], [], "team-b", {}, True),
    ],
)
def test_interest_of(
    active: list[models.Repository],
    holding: list[tuple[str, str]],
    namespace: str,
    labels: dict[str, str] | None,
    concerns: bool,
) -> None:
    assert granting.Interest.of(active, holding).concerns(namespace, labels) is concerns


def test_interest_of_keeps_the_selectors_in_order() -> None:
    other = _repo("db", pushAccess={"namespaceSelector": {"matchLabels": {"push": "yes"}}})
    interest = granting.Interest.of([PULL, PUSH, other], [])
    assert interest.names == frozenset({"team-a", "team-b", "ci", "builders", "registries"})
    assert [s.match_labels for s in interest.selectors] == [{"pull": "yes"}, {"push": "yes"}]
