"""One poller for every Registry: the resync, the servers' readiness and their
replication status, in place of three Kopf timers per Registry.

Kopf runs a task per timer and object and keeps the body of every object with a timer:
at 1,000 Registries that was 3,000 tasks, each with its chain of coroutines, and every
Registry's body, all the operator's life (issue 18). The poller reads the Registries from
the index the operator keeps anyway (`registries.PEERS_INDEX`), runs a bounded number of
polls at once, and, as Kopf's timers did, does nothing while Kopf's gates are shut (still
indexing after a start, or paused by a peer of higher priority).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from registry_operator import kopf_toggles
from registry_operator import status as status_
from registry_operator.handlers import runtime
from registry_operator.kube import errors

Key = runtime.Key

log = logging.getLogger(__name__)

PROBES_AT_ONCE = 4  # the threads of `Runtime.probes`
RESYNCS_AT_ONCE = 2
# The resync is checked this often (at most): a due Registry waits at most this long.
RESYNC_TICK_MAX = 5.0


@dataclasses.dataclass(frozen=True)
class Polled:
    """What the poller needs of one Registry (kept in the Registries' index)."""

    key: Key
    peers: bool  # lists replication peers: its replication status is read
    external: bool  # on S3 or PostgreSQL: every readiness answer matters, not only "full"
    deleting: bool


def polled_fields(body: Mapping[str, Any]) -> dict[str, bool]:
    """The fields the index keeps for the poller (beside the peers it keeps anyway)."""
    spec = body.get("spec") or {}
    return {
        "external": "s3" in (spec.get("storage") or {})
        or "postgresql" in (spec.get("metadata") or {}),
        "deleting": bool((body.get("metadata") or {}).get("deletionTimestamp")),
    }


def polled(stubs: Iterable[Mapping[str, Any]]) -> list[Polled]:
    found = []
    for stub in stubs:
        meta = stub.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            continue
        fields = stub.get("poll") or {}
        peers = ((stub.get("spec") or {}).get("replication") or {}).get("peers")
        found.append(
            Polled(
                key=(str(namespace), str(name)),
                peers=bool(peers),
                external=bool(fields.get("external")),
                deleting=bool(fields.get("deleting")),
            )
        )
    return found


class Schedule:
    """When each key is next due, one interval after its last run. A key seen for the
    first time is due within one interval, at a point spread by its hash, so that a
    thousand Registries seen at a start are not all due at once."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[Key, float] = {}

    def due(self, keys: Iterable[Key], now: float) -> list[Key]:
        """The keys due at `now` (each then scheduled one interval on); keys no longer
        given are forgotten."""
        known = set(keys)
        for gone in self._next.keys() - known:
            del self._next[gone]
        found = []
        for key in sorted(known):
            when = self._next.get(key)
            if when is None:
                self._next[key] = now + self.interval * (0.5 + 0.5 * _spread(key))
            elif when <= now:
                found.append(key)
                self._next[key] = now + self.interval
        return found


def _spread(key: Key) -> float:
    """A fraction in [0, 1) fixed by the key (the same in every operator process)."""
    digest = hashlib.sha256("/".join(key).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


async def each(keys: Iterable[Key], work: Callable[[Key], Awaitable[None]], at_once: int) -> None:
    """Run `work` over the keys, at most `at_once` at a time; a failure is logged and the
    others go on."""
    pending = iter(list(keys))

    async def worker() -> None:
        for key in pending:
            if not kopf_toggles.handling():
                return
            try:
                await work(key)
            except errors.KubeError as exc:
                log.warning("polling %s/%s failed, the next round retries: %s", *key, exc)
            except Exception:
                log.exception("polling %s/%s failed", *key)

    await asyncio.gather(*(worker() for _ in range(at_once)))


class Poller:
    def __init__(self, state: runtime.Runtime, *, resync_seconds: float, poll_seconds: float):
        self.state = state
        self.resync_seconds = resync_seconds
        self.poll_seconds = poll_seconds

    def ready(self) -> bool:
        """Whether to poll now: Kopf's gates are open and the index is known."""
        return kopf_toggles.handling() and self.state.peers_index is not None

    def registries(self) -> list[Polled]:
        stubs = self.state.registries()
        return [item for item in polled(stubs or ()) if not item.deleting]

    async def run(self) -> None:
        await asyncio.gather(
            self._every(self.poll_seconds, min(self.poll_seconds, 5.0), self.readiness_round),
            self._every(self.poll_seconds, 0.0, self.replication_round),
            self._every(self.poll_seconds, min(self.poll_seconds, 5.0), self.usage_round),
            self._resyncs(),
        )

    async def _every(
        self, interval: float, first: float, round_: Callable[[], Awaitable[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(first)
        while True:
            started = loop.time()
            if self.ready():
                await round_()
            # A round longer than the interval is followed by the next one at once.
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def _resyncs(self) -> None:
        schedule = Schedule(self.resync_seconds)
        loop = asyncio.get_running_loop()
        tick = min(RESYNC_TICK_MAX, self.resync_seconds / 4)
        while True:
            await asyncio.sleep(tick)
            if not self.ready():
                continue
            keys = [item.key for item in self.registries()]
            await each(schedule.due(keys, loop.time()), self.resync, RESYNCS_AT_ONCE)

    # -- one Registry --

    async def resync(self, key: Key) -> None:
        """The safety net under the watch events: catches anything a missed event left."""
        await self.state.reconcile(*key)
        await self.state.reconcile_access(*key)

    async def readiness_round(self) -> None:
        items = {item.key: item for item in self.registries()}
        await each(items, lambda key: self.readiness(key, items[key].external), PROBES_AT_ONCE)

    async def readiness(self, key: Key, external: bool) -> None:
        """The server's /readyz/writes, for StorageReady: a full volume on any Registry,
        and whether one on S3 or PostgreSQL reaches them. Only a change that matters
        reconciles (a Registry on a claim that is not full has nothing to say)."""
        state = self.state
        loop = asyncio.get_running_loop()
        observed: status_.Readiness | None = await loop.run_in_executor(
            state.probes, state.fetch_readiness, *key
        )
        if not external and observed is not None and not observed.storage_full:
            observed = None
        if state.readiness.get(key) == observed:
            return
        if observed is None:
            state.readiness.pop(key, None)
        else:
            state.readiness[key] = observed
        state.request_reconcile(*key)

    async def replication_round(self) -> None:
        keys = [item.key for item in self.registries() if item.peers]
        await each(keys, self.replication, PROBES_AT_ONCE)

    async def replication(self, key: Key) -> None:
        """Copy the server's per-peer replication status into the Registry's status."""
        state = self.state
        loop = asyncio.get_running_loop()
        observed = await loop.run_in_executor(state.probes, state.fetch_replication, *key)
        if state.replication.get(key) == observed:
            return
        state.replication[key] = observed
        state.request_reconcile(*key)

    async def usage_round(self) -> None:
        await each([item.key for item in self.registries()], self.usage, PROBES_AT_ONCE)

    async def usage(self, key: Key) -> None:
        """The server's per-repository usage, for the Repositories' status. Only a change
        reconciles access (which writes the statuses that changed)."""
        state = self.state
        loop = asyncio.get_running_loop()
        observed = await loop.run_in_executor(state.probes, state.fetch_usage, *key)
        if state.usage.get(key) == observed:
            return
        state.usage[key] = observed
        state.request_access(*key)
