"""What the runtime hands the access reconcile, and what it makes of the outcome: the
Repositories from Kopf's index (with our own newer status writes in place of older
ones), and the Registry's AccessApplied (one event per transition, its status woken)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf
import pytest

from registry_operator import granting, status
from registry_operator.handlers import repositories, runtime
from tests.registry_operator.fake_kube import FakeKube


def _body(name: str, version: str, **status_: Any) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Repository",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": version,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"registryRef": {"name": "main"}, "path": f"team/{name}"},
        "status": status_,
    }


def test_the_index_keeps_what_access_needs_by_registry() -> None:
    found = repositories.index_repository(kopf.Body(_body("api", "5", observedGeneration=1)))
    assert found is not None
    ((key, seen),) = found.items()
    assert key == ("ns", "main")
    assert seen.repository is not None and seen.repository.path == "team/api"
    # What its status says, not the status: an int per Repository.
    assert seen.status == status.essence({"observedGeneration": 1})
    assert seen.resource_version == "5"
    no_status = repositories.index_repository(kopf.Body(_body("new", "6")))
    assert no_status is not None and next(iter(no_status.values())).status is None
    bad = _body("bad", "7")
    bad["spec"]["path"] = "Not A Path"
    invalid = repositories.index_repository(kopf.Body(bad))
    assert invalid is not None
    (seen_bad,) = invalid.values()
    assert seen_bad.repository is None and "spec.path" in seen_bad.invalid
    gone = _body("gone", "8")
    gone["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    assert repositories.index_repository(kopf.Body(gone)) is None
    space = {"metadata": {"name": "team-a", "labels": {"x": "y"}}, "status": {"phase": "Active"}}
    assert repositories.index_namespace(kopf.Body(space))[repositories.ALL].labels == {"x": "y"}


def test_our_newer_status_write_stands_in_until_the_index_has_it() -> None:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    assert state.seen("ns", "main") is None  # no index yet: the reconcile lists
    old = granting.see(_body("api", "10", observedGeneration=0))
    assert old is not None
    index: dict[Any, list[granting.Seen]] = {old[0]: [old[1]]}
    state.repositories_index = index
    state.statuses[("ns", "api")] = ("12", 42)
    (seen,) = state.seen("ns", "main") or []
    assert seen.status == 42
    newer = granting.see(_body("api", "12", observedGeneration=1))
    assert newer is not None
    index[newer[0]] = [newer[1]]
    (seen,) = state.seen("ns", "main") or []
    assert seen is newer[1]
    assert ("ns", "api") not in state.statuses  # caught up: forgotten


@pytest.mark.parametrize(
    ("version", "than", "result"),
    [
        ("12", "12", True),
        ("13", "12", True),
        ("9", "12", False),
        ("x", "x", True),
        ("x", "y", False),
    ],
)
def test_resource_versions_compare_as_numbers_when_they_are(
    version: str, than: str, result: bool
) -> None:
    assert runtime._not_older(version, than) is result


async def test_access_applied_tells_each_transition_once() -> None:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    posted: list[tuple[str, str]] = []
    woken: list[str] = []
    state._post = lambda ref, event: posted.append((event.type, event.reason))  # type: ignore[method-assign]

    async def reconcile_(namespace: str, name: str) -> None:
        woken.append(name)

    state.reconcile = reconcile_  # type: ignore[method-assign,assignment]
    ref = {"apiVersion": "berth.dev/v1alpha1", "kind": "Registry", "metadata": {"name": "main"}}
    ok = status.Condition("AccessApplied", "True", "PolicyWritten", "written")
    bad = status.Condition("AccessApplied", "False", "PolicyNotWritten", "too long")
    worse = status.Condition("AccessApplied", "False", "PolicyNotWritten", "too long, again")

    async def outcome(applied: status.Condition, stored: status.Condition | None) -> None:
        previous = {} if stored is None else {**stored.__dict__}
        state._access_applied(
            "ns",
            "main",
            granting.Outcome(applied=applied, previous_applied=previous, registry_ref=ref),
        )
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    await outcome(ok, None)
    assert posted == [] and woken == ["main"]  # the first word: a status, no event
    await outcome(ok, ok)
    assert posted == [] and woken == ["main"]
    await outcome(bad, ok)
    await outcome(worse, bad)  # the message moved, the state did not: no second event
    await outcome(worse, worse)
    assert posted == [("Warning", "PolicyNotWritten")]
    await outcome(ok, worse)
    assert posted == [("Warning", "PolicyNotWritten"), ("Normal", "AccessApplied")]
    assert woken == ["main", "main", "main", "main"]  # each time the status differs


def test_access_passes_are_spaced_by_their_own_duration() -> None:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    key = ("ns", "main")
    assert state._access_pause(key) == 0.0  # never ran: at once
    now = time.monotonic()
    state._access_runs[key] = (0.8, now)  # took 0.8 s, just ended
    assert 0.7 < state._access_pause(key) <= 0.8
    state._access_runs[key] = (30.0, now)  # a huge pass: at most ACCESS_GAP_MAX
    assert state._access_pause(key) <= runtime.ACCESS_GAP_MAX
    state._access_runs[key] = (0.8, now - 5)  # long ago: at once
    assert state._access_pause(key) == 0.0
