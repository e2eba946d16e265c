"""The condition and timestamp helpers both kinds' statuses share (status.py), by table."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import status


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_800_000_000, "2027-01-15T08:00:00Z"),
        (1_800_000_000.999, "2027-01-15T08:00:00Z"),  # whole seconds: never rounded up
        (1_800_000_059.5, "2027-01-15T08:00:59Z"),
    ],
)
def test_rfc3339_writes_whole_seconds_in_utc(seconds: float, expected: str) -> None:
    assert status.rfc3339(seconds) == expected


READY = {"type": "Ready", "status": "True", "reason": "Available", "message": "1/1"}
DEGRADED = {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": ""}


@pytest.mark.parametrize(
    ("found", "type_", "expected"),
    [
        ({"conditions": [READY, DEGRADED]}, "Degraded", DEGRADED),
        ({"conditions": [READY, DEGRADED]}, "Ready", READY),
        ({"conditions": [READY]}, "Degraded", {}),
        ({"conditions": None}, "Ready", {}),
        ({}, "Ready", {}),
    ],
)
def test_condition_of_finds_the_type_or_nothing(
    found: dict[str, Any], type_: str, expected: dict[str, Any]
) -> None:
    assert status.condition_of(found, type_) == expected


def test_condition_of_returns_a_copy() -> None:
    found = {"conditions": [dict(READY)]}
    copy = status.condition_of(found, "Ready")
    assert copy == READY and copy is not found["conditions"][0]


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({}, False),
        ({"lastTransitionTime": "2027-01-15T08:00:00Z", "observedGeneration": 7}, False),
        ({"status": "False"}, True),
        ({"reason": "Other"}, True),
        ({"message": "2/2"}, True),
    ],
)
def test_differs_compares_status_reason_and_message(change: dict[str, Any], differs: bool) -> None:
    assert status.differs(READY, {**READY, **change}) is differs
    assert status.differs({}, READY) is True


def test_the_essence_of_a_status_ignores_only_the_transition_times() -> None:
    found = [status.Condition("Ready", "True", "Granted", "pull Secrets in 2 namespaces")]
    fields = {"pullSecretNamespaces": ["a", "b"], "pullSecretName": "p"}
    early = {
        **fields,
        "observedGeneration": 3,
        "conditions": status.render_conditions(found, [], 3, "2026-01-01T00:00:00Z"),
    }
    late = {**early, "conditions": status.render_conditions(found, [], 3, "2027-01-01T00:00:00Z")}
    assert status.essence(early) == status.essence(late) == status.essence_of(fields, found, 3)
    assert status.essence_of(fields, found, 4) != status.essence(early)
    moved = {**fields, "pullSecretNamespaces": ["a"]}
    assert status.essence_of(moved, found, 3) != status.essence(early)
    told = [status.Condition("Ready", "True", "Granted", "pull Secrets in 1 namespace")]
    assert status.essence_of(fields, told, 3) != status.essence(early)
