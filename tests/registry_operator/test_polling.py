"""The poller of every Registry (resync, readiness, replication status), which replaced
three Kopf timers per Registry: its schedule, its bounds, its gates, and what a poll
changes (issue 18)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from registry_operator import kopf_toggles, status
from registry_operator.handlers import lifecycle, polling, registries, runtime
from tests.registry_operator.fake_kube import FakeKube


def _registry(name: str, *, spec: dict[str, Any] | None = None, deleting: bool = False) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return kopf.Body({"metadata": meta, "spec": spec or {"storage": {"emptyDir": {}}}})


def _index(*bodies: Any) -> dict[str, list[Any]]:
    """Kopf's index as the handler fills it: key -> the values it returned."""
    found: dict[str, list[Any]] = {}
    for body in bodies:
        for key, value in registries.index_peers(body).items():
            found.setdefault(key, []).append(value)
    return found


PEERS = {"replication": {"peers": [{"name": "to-eu", "registryRef": {"name": "eu"}}]}}


def test_the_index_tells_the_poller_what_it_needs() -> None:
    index = _index(
        _registry("plain"),
        _registry("s3", spec={"storage": {"s3": {"bucket": "b"}}}),
        _registry("pg", spec={"storage": {"emptyDir": {}}, "metadata": {"postgresql": {}}}),
        _registry("peered", spec={"storage": {"emptyDir": {}}, **PEERS}),
        _registry("gone", deleting=True),
    )
    found = {item.key[1]: item for item in polling.polled(v for vs in index.values() for v in vs)}
    assert [(n, i.external, i.peers, i.deleting) for n, i in sorted(found.items())] == [
        ("gone", False, False, True),
        ("peered", False, True, False),
        ("pg", True, False, False),
        ("plain", False, False, False),
        ("s3", True, False, False),
    ]


def test_a_schedule_spreads_first_runs_and_repeats_each_interval() -> None:
    schedule = polling.Schedule(100.0)
    keys = [("ns", f"r{i}") for i in range(1000)]
    assert schedule.due(keys, 0.0) == []  # first seen: due within one interval
    firsts = {}
    for now in range(0, 101):
        for key in schedule.due(keys, float(now)):
            firsts.setdefault(key, now)
    assert len(firsts) == len(keys)  # every key ran once in the first interval
    assert 50 <= min(firsts.values()) <= 52 and 98 <= max(firsts.values()) <= 100
    per_second = [list(firsts.values()).count(t) for t in range(50, 101)]
    assert max(per_second) < 60  # spread, not all at once (1,000 over 50 s: ~20 a second)
    again = [key for now in range(101, 202) for key in schedule.due(keys, float(now))]
    assert sorted(again) == sorted(keys)  # once more, one interval after each first run
    assert schedule.due(keys[:10], 1000.0) == keys[:10]
    assert schedule.due(keys, 1000.0) == []  # the forgotten ones start over, spread


async def test_each_bounds_the_polls_at_once_and_survives_failures() -> None:
    running, most, done = 0, 0, []

    async def work(key: runtime.Key) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        if key[1] == "r3":
            raise RuntimeError("a server that answers nonsense")
        done.append(key)

    await polling.each([("ns", f"r{i}") for i in range(20)], work, 4)
    assert most == 4
    assert len(done) == 19


@pytest.fixture
def gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """As after `kopf_toggles.install()`, with no gate built yet."""
    monkeypatch.setattr(kopf_toggles, "_installed", True)
    monkeypatch.setattr(kopf_toggles, "_gates", {})


async def test_polls_wait_for_kopfs_gates(gates: None) -> None:
    assert not kopf_toggles.handling()  # Kopf has not built its index gate yet
    indexed = kopf_toggles.CountingToggleSet(all)
    paused = kopf_toggles.CountingToggleSet(any)
    blocker = await indexed.make_toggle(False, name="still indexing")
    assert not kopf_toggles.handling()
    await blocker.turn_to(True)
    assert kopf_toggles.handling()
    peer = await paused.make_toggle(True, name="a peer of higher priority")
    assert not kopf_toggles.handling()
    ran: list[runtime.Key] = []

    async def work(key: runtime.Key) -> None:
        ran.append(key)

    await polling.each([("ns", "a"), ("ns", "b")], work, 2)
    assert ran == []  # paused: nothing polled
    await peer.turn_to(False)
    await polling.each([("ns", "a"), ("ns", "b")], work, 2)
    assert sorted(ran) == [("ns", "a"), ("ns", "b")]


def _state(*bodies: Any) -> tuple[runtime.Runtime, list[runtime.Key]]:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    state.peers_index = _index(*bodies)
    asked: list[runtime.Key] = []
    state.request_reconcile = lambda namespace, name: asked.append((namespace, name))  # type: ignore[method-assign]
    return state, asked


FULL = status.Readiness(503, "storage full: 98% of the volume is used")
OK = status.Readiness(200, "ok")
DOWN = status.Readiness(None, "GET http://x/readyz/writes: connection refused")


async def test_readiness_reconciles_only_on_a_change_that_matters() -> None:
    state, asked = _state(_registry("disk"), _registry("s3", spec={"storage": {"s3": {}}}))
    answers = {("ns", "disk"): OK, ("ns", "s3"): OK}
    state.fetch_readiness = lambda namespace, name: answers[(namespace, name)]  # type: ignore[method-assign]
    poller = polling.Poller(state, resync_seconds=300, poll_seconds=15)

    await poller.readiness_round()
    # On a volume, only "full" is worth a status; on S3 every answer is.
    assert asked == [("ns", "s3")]
    assert state.readiness == {("ns", "s3"): OK}
    asked.clear()
    await poller.readiness_round()
    assert asked == []  # nothing changed
    answers[("ns", "disk")] = FULL
    answers[("ns", "s3")] = DOWN
    await poller.readiness_round()
    assert sorted(asked) == [("ns", "disk"), ("ns", "s3")]
    assert state.readiness == {("ns", "disk"): FULL, ("ns", "s3"): DOWN}
    asked.clear()
    answers[("ns", "disk")] = OK
    await poller.readiness_round()
    assert asked == [("ns", "disk")]  # no longer full: said once
    assert ("ns", "disk") not in state.readiness
    state.probes.shutdown()


async def test_replication_status_is_read_only_where_there_are_peers() -> None:
    state, asked = _state(
        _registry("alone"), _registry("main", spec={"storage": {"emptyDir": {}}, **PEERS})
    )
    read: list[runtime.Key] = []

    def fetch(namespace: str, name: str) -> status.ReplicationObservation:
        read.append((namespace, name))
        return status.ReplicationObservation(payload={"peers": []})

    state.fetch_replication = fetch  # type: ignore[method-assign]
    poller = polling.Poller(state, resync_seconds=300, poll_seconds=15)
    await poller.replication_round()
    await poller.replication_round()
    assert read == [("ns", "main"), ("ns", "main")]
    assert asked == [("ns", "main")]  # the second answer was the same
    state.probes.shutdown()


async def test_a_deleting_registry_is_not_polled() -> None:
    state, asked = _state(_registry("gone", spec={"storage": {"s3": {}}}, deleting=True))
    state.fetch_readiness = lambda namespace, name: pytest.fail("polled")  # type: ignore[method-assign]
    await polling.Poller(state, resync_seconds=300, poll_seconds=15).readiness_round()
    assert asked == []
    state.probes.shutdown()


async def test_started_at_startup_resyncs_and_stops_at_cleanup() -> None:
    state, _ = _state(_registry("a"), _registry("b"))
    resynced: list[runtime.Key] = []

    async def reconcile(namespace: str, name: str) -> Any:
        resynced.append((namespace, name))

    async def reconcile_access(namespace: str, name: str) -> Any:
        return None

    state.reconcile = reconcile  # type: ignore[method-assign]
    state.reconcile_access = reconcile_access  # type: ignore[method-assign]
    state.fetch_readiness = lambda namespace, name: OK  # type: ignore[method-assign]
    memo = kopf.Memo(berth=state)
    start = lifecycle.polling_starter(resync_seconds=0.2, poll_seconds=0.05)
    await start(memo=memo)
    assert state.poller is not None
    await asyncio.sleep(0.7)  # first runs within 0.2 s, then every 0.2 s
    await lifecycle.stop_polling(memo=memo)
    assert state.poller is None
    counts = {key: resynced.count(key) for key in set(resynced)}
    assert set(counts) == {("ns", "a"), ("ns", "b")}
    assert all(2 <= n <= 5 for n in counts.values()), counts
    state.probes.shutdown()


def test_kopfs_posting_variables_are_the_ones_kept() -> None:
    """`keep_posting_context` copies Kopf's variables by name; a Kopf upgrade that renames
    them must fail here, not silently drop the poller's events."""
    from kopf._core.engines import posting

    names = {v.name for v in (posting.event_queue_var, posting.event_queue_loop_var)}
    names.add(posting.settings_var.name)
    assert names == runtime.KOPF_POSTING_VARS


async def test_events_of_reconciles_the_poller_asked_for_are_posted() -> None:
    """The poller runs outside any handler, where Kopf's event queue is not in the
    context; the queue kept from a handler posts its reconciles' events."""
    import contextvars

    from kopf._core.engines import posting

    state, _ = _state()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    meta = {"name": "a", "namespace": "ns", "uid": "uid-a"}
    ref = {"apiVersion": "berth.dev/v1alpha1", "kind": "Registry", "metadata": meta}
    event = runtime.Event("Warning", "StorageFull", "the volume is full")
    state._post(ref, event)  # no handler has run: logged, not posted, no crash
    assert queue.empty()

    def in_a_handler() -> None:
        posting.event_queue_var.set(queue)
        posting.event_queue_loop_var.set(asyncio.get_running_loop())
        posting.settings_var.set(kopf.OperatorSettings())
        state.keep_posting_context()

    contextvars.copy_context().run(in_a_handler)
    state._post(ref, event)  # outside the handler's context
    posted = queue.get_nowait()
    assert (posted.type, posted.reason, posted.message) == ("Warning", "StorageFull", event.message)
    assert posted.ref["name"] == "a"
    state.probes.shutdown()
