"""The children's watch (metadata only, one thread per kind): what reaches the reconciles,
when, and what an expired watch does. The real API server's side is in the integration
tests (drift of a child repaired; tests/integration/test_install_rbac.py lists and
watches every kind)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from registry_operator import kopf_toggles
from registry_operator.handlers import child_watch, runtime
from registry_operator.kube import errors
from registry_operator.rendering import names

LABELS = {names.REGISTRY_LABEL: "main", names.MANAGED_BY_LABEL: names.MANAGED_BY}
PULL = {names.COMPONENT_LABEL: names.PULL_SECRET_COMPONENT}


def _meta(name: str, version: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "ns",
        "resourceVersion": version,
        "labels": {**LABELS, **labels},
    }


class ScriptedKube:
    """list_metadata / watch_metadata from a script; every watch is recorded."""

    def __init__(self, watches: list[list[tuple[str, dict[str, Any]] | Exception]]) -> None:
        self.watches = watches
        self.listed: list[str] = []
        self.watched_from: list[str] = []
        self.done = threading.Event()

    def list_metadata(
        self, api_version: str, kind: str, selector: str, namespace: str | None = None
    ) -> Any:
        assert selector == "app.kubernetes.io/managed-by=berth-operator"
        self.listed.append(kind)
        return [_meta("main-config", "5")], "10"

    def watch_metadata(
        self, api_version: str, kind: str, version: str, *args: Any, **kwargs: Any
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        self.watched_from.append(version)
        if not self.watches:
            self.done.set()
            threading.Event().wait(0.05)
            return
        for item in self.watches.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def _state(kube: ScriptedKube) -> tuple[runtime.Runtime, list[tuple[str, str, str]]]:
    state = runtime.Runtime(kube=kube)  # type: ignore[arg-type]
    asked: list[tuple[str, str, str]] = []
    state.request_reconcile = lambda ns, name: asked.append(("registry", ns, name))  # type: ignore[method-assign]
    state.request_access = lambda ns, name: asked.append(("access", ns, name))  # type: ignore[method-assign]
    return state, asked


async def _run(kube: ScriptedKube, state: runtime.Runtime) -> None:
    watch = child_watch.ChildWatch(state, asyncio.get_running_loop(), (("v1", "ConfigMap"),))
    watch.start()
    try:
        await asyncio.to_thread(kube.done.wait, 5)
        await asyncio.sleep(0.05)  # the last deliveries, on the loop
    finally:
        await asyncio.to_thread(watch.stop)
        state.probes.shutdown()


async def test_events_after_the_listing_ask_for_their_registry() -> None:
    state, asked = _state(
        ScriptedKube(
            [
                [
                    ("MODIFIED", _meta("main", "11")),
                    ("BOOKMARK", {"resourceVersion": "12"}),
                    ("MODIFIED", _meta("main-ns-pull", "13", **PULL)),
                    ("DELETED", _meta("main-config", "14")),
                    ("MODIFIED", {"name": "x", "namespace": "ns", "resourceVersion": "15"}),
                ]
            ]
        )
    )
    state.written[("ConfigMap", "ns", "main-config")] = "5"
    kube = state.kube
    await _run(kube, state)  # type: ignore[arg-type]
    assert kube.listed == ["ConfigMap"]  # type: ignore[attr-defined]
    # The listing asks for nothing (the resume handlers cover it); from the list's
    # version on, each event asks; a bookmark moves the version only.
    assert kube.watched_from[:2] == ["10", "15"]  # type: ignore[attr-defined]
    # A pull Secret is the access reconcile's; the unlabelled object is no child of ours.
    assert asked == [
        ("registry", "ns", "main"),
        ("access", "ns", "main"),
        ("registry", "ns", "main"),
    ]
    assert ("ConfigMap", "ns", "main-config") not in state.written  # forgotten when deleted


async def test_an_expired_watch_lists_again_and_mends_what_changed() -> None:
    kube = ScriptedKube([[errors.Expired("too old", 410)]])
    state, asked = _state(kube)
    state.written[("ConfigMap", "ns", "main-config")] = "4"  # it changed since our write
    await _run(kube, state)
    assert kube.listed == ["ConfigMap", "ConfigMap"]
    assert asked == [("registry", "ns", "main")]  # from the second listing only


async def test_a_failed_watch_is_watched_again_from_where_it_was() -> None:
    kube = ScriptedKube([[("MODIFIED", _meta("main", "11")), errors.Retryable("reset")]])
    state, asked = _state(kube)
    await _run(kube, state)
    assert kube.listed == ["ConfigMap"]
    assert kube.watched_from[:2] == ["10", "11"]
    assert asked == [("registry", "ns", "main")]


async def test_nothing_is_asked_while_kopf_handlers_do_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kopf_toggles, "handling", lambda: False)
    kube = ScriptedKube([[("MODIFIED", _meta("main", "11"))]])
    state, asked = _state(kube)
    await _run(kube, state)
    assert asked == []
