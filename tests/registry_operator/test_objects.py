"""objects.contains: does a live object already hold what the operator writes (by table)."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import objects

LIVE = {
    "metadata": {
        "name": "main",
        "labels": {"app": "berth", "added-by": "someone-else"},
        "resourceVersion": "7",
    },
    "spec": {"replicas": 1, "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
}


@pytest.mark.parametrize(
    ("desired", "held"),
    [
        ({}, True),
        ({"metadata": {"name": "main"}}, True),
        ({"metadata": {"labels": {"app": "berth"}}}, True),  # another tool's label is extra
        ({"spec": {"ports": [{"name": "http", "port": 5000}]}}, True),  # a defaulted field
        ({"spec": {"replicas": 2}}, False),
        ({"metadata": {"labels": {"app": "other"}}}, False),
        ({"metadata": {"annotations": {"a": "b"}}}, False),  # a missing field
        ({"spec": {"ports": []}}, False),  # lists are replaced whole: the length counts
        ({"spec": {"ports": [{"port": 5000}, {"port": 5001}]}}, False),
        ({"spec": {"ports": [{"port": 5001}]}}, False),
        ({"spec": {"replicas": {"min": 1}}}, False),  # a mapping where a value stands
        ({"spec": {"replicas": [1]}}, False),  # a list where a value stands
    ],
)
def test_contains(desired: dict[str, Any], held: bool) -> None:
    assert objects.contains(LIVE, desired) is held


@pytest.mark.parametrize(
    ("actual", "desired", "held"),
    [
        (None, {}, False),  # an absent object holds nothing, not even nothing
        (None, None, True),
        ("a", "a", True),
        (1, 1.0, True),
        ([], [], True),
        ({"a": None}, {"a": None}, True),
        ({}, {"a": None}, False),
    ],
)
def test_contains_values(actual: Any, desired: Any, held: bool) -> None:
    assert objects.contains(actual, desired) is held
