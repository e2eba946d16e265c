"""Handlers at a thousand Registries (issue 18, the restart case of the bench).

- The resume handler after a restart: one reconcile per Registry, not two. A Registry
  created or changed while the operator was down gets its create or update handler at
  start-up, and Kopf mixes the resume handler into the same cycle under that cause's
  reason; the resume handler then leaves the reconcile to the other one.
- A child's watch event asks for its Registry's reconcile without waiting for it: a
  burst shares one queued run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest

from registry_operator import reconcile
from registry_operator.handlers import children, registries, runtime
from registry_operator.rendering import names
from tests.registry_operator.fake_kube import FakeKube


@pytest.fixture
def reconciled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    async def reconcile_registry(*, name: str, **_: Any) -> None:
        calls.append(name)

    monkeypatch.setattr(registries, "reconcile_registry", reconcile_registry)
    return calls


@pytest.mark.parametrize("reason", [kopf.Reason.UPDATE, kopf.Reason.CREATE])
async def test_mixed_into_a_create_or_update_it_leaves_the_reconcile_to_that(
    reconciled: list[str], reason: kopf.Reason
) -> None:
    logger = logging.getLogger("test")
    await registries.resume_registry(
        reason=reason, namespace="ns", name="main", memo=None, logger=logger
    )
    assert reconciled == []


async def test_on_its_own_it_reconciles(reconciled: list[str]) -> None:
    logger = logging.getLogger("test")
    await registries.resume_registry(
        reason=kopf.Reason.RESUME, namespace="ns", name="main", memo=None, logger=logger
    )
    await registries.resume_registry(namespace="ns", name="other", memo=None, logger=logger)
    assert reconciled == ["main", "other"]


def test_registered_for_resume_only() -> None:
    from registry_operator import handlers

    registry = kopf.OperatorRegistry()
    handlers.register(registry, resync_seconds=300)
    found = {handler.id: handler.fn for handler in registry._changing.get_all_handlers()}
    assert found["reconcile-resume"] is registries.resume_registry
    assert found["reconcile-update"] is registries.reconcile_registry


async def test_child_events_ask_for_one_reconcile_and_do_not_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    started = asyncio.Event()
    release = asyncio.Event()
    runs: list[tuple[str, str]] = []

    def job(namespace: str, name: str) -> Any:
        async def run() -> reconcile.Outcome:
            runs.append((namespace, name))
            started.set()
            await release.wait()
            return reconcile.Outcome()

        return run

    monkeypatch.setattr(state, "_reconcile_job", job)
    labels = {names.REGISTRY_LABEL: "main", names.MANAGED_BY_LABEL: names.MANAGED_BY}

    async def event(version: str) -> None:
        meta = {"name": "main", "namespace": "ns", "resourceVersion": version, "labels": labels}
        children.changed(state, "Deployment", "MODIFIED", meta)  # never waits for the reconcile

    await event("1")
    await asyncio.wait_for(started.wait(), timeout=1)
    for version in range(2, 50):  # a burst while one runs: one more run, queued
        await event(str(version))
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert runs == [("ns", "main"), ("ns", "main")]
