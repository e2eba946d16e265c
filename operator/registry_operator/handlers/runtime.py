"""What every handler shares: the API client, the options and the per-Registry queues.

Two reconciles exist per Registry: its own children (`reconcile`) and its access
(`granting`: policy, robots, the Secrets in granted namespaces). Each has a queue that
runs one at a time per Registry and folds bursts of triggers into one run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import kopf

from registry_operator import (
    access,
    coalescing,
    credentials,
    fetching,
    granting,
    node_access,
    reconcile,
)
from registry_operator import robots as robots_
from registry_operator import status as status_
from registry_operator import usage as usage_
from registry_operator.kube import client as kube_client
from registry_operator.kube import errors
from registry_operator.rendering import names

if TYPE_CHECKING:  # child_watch imports this module
    from registry_operator.handlers.child_watch import ChildWatch

Key = tuple[str, str]  # (namespace, name) of a Registry
Wake = reconcile.Wake
Event = reconcile.Event

log = logging.getLogger(__name__)
# The longest pause between two access passes of one Registry (see _access_pause).
ACCESS_GAP_MAX = 2.0
# After an access pass this long (seconds), the heap's free pages go back to the system
# (`trim_heap`), at most once every TRIM_GAP seconds.
TRIM_AFTER = 0.2
TRIM_GAP = 10.0
# Kopf's context variables `kopf.event` reads (kopf/_core/engines/posting.py; Kopf is
# pinned and tests/registry_operator/test_kopf_toggles.py checks the names).
KOPF_POSTING_VARS = frozenset({"event_queue_var", "event_queue_loop_var", "settings_var"})
# Reconciles and access passes handed to worker threads at once (asyncio's default pool
# has 6 threads on 2 cores; the readiness probes have their own).
PASSES_AT_ONCE = 4


@dataclasses.dataclass
class Runtime:
    kube: kube_client.Client
    peering: str | None = None  # the ClusterKopfPeering name; None when standalone
    options: reconcile.Options = dataclasses.field(default_factory=reconcile.Options)
    access_options: granting.Options | None = None  # None: built from `endpoints`
    endpoints: fetching.Endpoints = dataclasses.field(default_factory=fetching.Endpoints)
    queue: coalescing.Coalescer[Key, reconcile.Outcome] = dataclasses.field(
        default_factory=coalescing.Coalescer
    )
    access_queue: coalescing.Coalescer[Key, granting.Outcome] = dataclasses.field(
        default_factory=coalescing.Coalescer
    )
    # (kind, namespace, name) -> resourceVersion our last write produced.
    written: dict[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)
    # Which namespaces each Registry's Repositories could grant (for namespace events).
    interest: dict[Key, granting.Interest] = dataclasses.field(default_factory=dict)
    # The labels (and whether terminating) of every namespace, as last seen.
    namespaces: dict[str, tuple[Mapping[str, str], bool]] = dataclasses.field(default_factory=dict)
    replication: dict[Key, status_.ReplicationObservation] = dataclasses.field(default_factory=dict)
    # Each Registry's repositories' usage as its server last reported it (Repository status).
    usage: dict[Key, usage_.Observation] = dataclasses.field(default_factory=dict)
    # The last /readyz/writes answer worth reporting of each Registry (StorageReady).
    readiness: dict[Key, status_.Readiness] = dataclasses.field(default_factory=dict)
    # The servers' readiness is asked on threads of its own: a thousand Registries whose
    # servers do not answer must not hold the threads the reconciles run on.
    probes: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="readiness"
        )
    )
    # Kopf's index of every Registry's node port claim (live; set at start-up), and the
    # claims as the Registry event handler last saw them (to notice what changed).
    claims_index: Mapping[Any, Iterable[node_access.Claim]] | None = None
    claims_seen: dict[str, node_access.Claim] = dataclasses.field(default_factory=dict)
    # Kopf's index of every Registry's name and peers (`peering.peers_stub`; live).
    peers_index: Mapping[Any, Iterable[Mapping[str, Any]]] | None = None
    # Each Registry's AccessApplied as its access reconcile last found it.
    applied: dict[Key, status_.Condition] = dataclasses.field(default_factory=dict)
    # Kopf's indexes of Repositories (by Registry) and namespaces (live; set at start-up).
    repositories_index: Mapping[Any, Iterable[granting.Seen]] | None = None
    namespaces_index: Mapping[Any, Iterable[access.Namespace]] | None = None
    # Repository (namespace, name) -> (resourceVersion, status essence) of our last status
    # write, until the index has seen that version: a pass in between must not take the
    # older status for the current one (it would read and write it again).
    statuses: dict[Key, tuple[str, int]] = dataclasses.field(default_factory=dict)
    # Per Registry: (seconds the last access pass took, when it ended; monotonic).
    _access_runs: dict[Key, tuple[float, float]] = dataclasses.field(default_factory=dict)
    _later: dict[Key, asyncio.TimerHandle] = dataclasses.field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    # A pass takes its snapshots (the claims, the peers, the Repositories: copies of
    # lists over every Registry) only once it holds a slot: after a restart a thousand
    # reconciles waiting for a thread each held their own copies (issue 18).
    slots: asyncio.Semaphore = dataclasses.field(
        default_factory=lambda: asyncio.Semaphore(PASSES_AT_ONCE)
    )
    # The poller of every Registry (`polling.Poller`), from startup to cleanup.
    poller: asyncio.Task[None] | None = None
    # The watch of the children (`child_watch.ChildWatch`), from startup to cleanup, and
    # the namespaces it watches (the operator's --namespace; empty: all).
    child_watch: ChildWatch | None = None
    namespaces_watched: tuple[str, ...] = ()
    # Gives the heap's free pages back (the operator's `trim_heap`; None: never).
    trim_heap: Callable[[], object] | None = None
    _trimmed: float = 0.0  # monotonic
    _trim_pending: asyncio.TimerHandle | None = None
    # Kopf's event queue, as its handlers see it (`keep_posting_context`): what the
    # reconciles the poller asks for post their events through.
    _posting: contextvars.Context | None = None

    def __post_init__(self) -> None:
        if self.access_options is None:
            self.access_options = granting.Options(prober=self.probe, usage=self.usage_of)
        self.access_queue.pause = self._access_pause

    def _access_pause(self, key: Key) -> float:
        """How long a queued access pass waits: as long as the last one took, counted
        from its end, at most ACCESS_GAP_MAX. A single change after a quiet spell starts
        at once; in a burst (thousands of Repositories created) passes leave the loop and
        the watch half the CPU, instead of running back to back, each over everything."""
        last = self._access_runs.get(key)
        if last is None:
            return 0.0
        took, ended = last
        return max(0.0, min(took, ACCESS_GAP_MAX) - (time.monotonic() - ended))

    # -- echo detection --

    def own_write(self, kind: str, namespace: str, name: str, resource_version: str) -> bool:
        """Whether a watch event only echoes our own write: nothing to repair."""
        return self.written.get((kind, namespace, name)) == resource_version

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.written.pop((kind, namespace, name), None)
        if kind == "Repository":
            self.statuses.pop((namespace, name), None)

    # -- the reconciles --

    def claims(self) -> list[node_access.Claim] | None:
        """A snapshot of every Registry's claim; None before the index is known (the
        reconciles then list the Registries themselves). Call it on the event loop."""
        if self.claims_index is None:
            return None
        return [claim for store in self.claims_index.values() for claim in store]

    def registries(self) -> list[Mapping[str, Any]] | None:
        """A snapshot of every Registry's name and peers; None before the index is known
        (a reconcile after a spec change then lists the Registries). On the event loop."""
        if self.peers_index is None:
            return None
        return [stub for store in self.peers_index.values() for stub in store]

    def seen(self, namespace: str, name: str) -> list[granting.Seen] | None:
        """A snapshot of the Registry's Repositories from the index (None before it is
        known), with our own newer status writes in place of older ones."""
        if self.repositories_index is None:
            return None
        found = []
        for item in self.repositories_index.get((namespace, name), ()):
            key = (item.owner.namespace, item.owner.name)
            ours = self.statuses.get(key)
            if ours is not None:
                if _not_older(item.resource_version, ours[0]):
                    del self.statuses[key]  # the index has caught up
                else:
                    item = dataclasses.replace(item, status=ours[1])
            found.append(item)
        return found

    def namespaces_seen(self) -> list[access.Namespace] | None:
        if self.namespaces_index is None:
            return None
        return [ns for store in self.namespaces_index.values() for ns in store]

    def keep_posting_context(self) -> None:
        """Keep what `kopf.event` needs of a Kopf handler's context (Kopf's event queue,
        its loop and settings; nothing of the handler's object) when called in one. The
        reconciles run in contexts of their own (`coalescing`, `spawn`), which keep no
        handler's body alive, and post their events through this one."""
        if self._posting is not None:
            return
        found = {
            var: value
            for var, value in contextvars.copy_context().items()
            if var.name in KOPF_POSTING_VARS
        }
        if len(found) < len(KOPF_POSTING_VARS):
            return  # not in a handler (the poller)
        kept = contextvars.Context()
        for var, value in found.items():
            kept.run(var.set, value)
        self._posting = kept

    def _post(self, ref: Mapping[str, Any], event: Event) -> None:
        body = kopf.Body(cast(kopf.RawBody, dict(ref)))
        post = functools.partial(
            kopf.event, body, type=event.type, reason=event.reason, message=event.message
        )
        if self._posting is not None:
            self._posting.run(post)
            return
        try:
            post()  # a test calling a handler directly
        except LookupError:
            log.warning("event %s on %s not posted: no handler has run yet", event, ref)

    def _reconcile_job(
        self, namespace: str, name: str
    ) -> Callable[[], Coroutine[Any, Any, reconcile.Outcome]]:
        async def job() -> reconcile.Outcome:
            told = reconcile.Told()
            try:
                async with self.slots:
                    outcome = await asyncio.to_thread(
                        reconcile.reconcile,
                        self.kube,
                        namespace,
                        name,
                        self.options,
                        self.replication.get((namespace, name)),
                        told,
                        self.claims(),
                        self.applied.get((namespace, name)),
                        self.readiness.get((namespace, name)),
                        self.registries(),
                    )
            except BaseException:
                # What it changed before failing is still worth telling.
                if told.ref is not None:
                    for event in told.events:
                        self._post(told.ref, event)
                raise
            self.written.update(outcome.written)
            if outcome.trust is not None:
                self.endpoints.remember(namespace, name, outcome.trust)
            # Posted here, inside the coalesced job, so callers sharing it do not repeat them.
            if outcome.ref is not None:
                for event in outcome.events:
                    self._post(outcome.ref, event)
            for ref, event in outcome.elsewhere:
                self._post(ref, event)
            self._wake(outcome.wake)
            return outcome

        return job

    async def reconcile(self, namespace: str, name: str) -> reconcile.Outcome:
        """Reconcile one Registry's children (never two at once) and post its events."""
        self.keep_posting_context()
        return await self.queue.run((namespace, name), self._reconcile_job(namespace, name))

    def request_reconcile(self, namespace: str, name: str) -> None:
        """Ask for a reconcile without waiting: what the children's watch events do. A
        burst of them shares the one queued run, and no watch worker waits for it while
        holding its event's body (a thousand Registries rolling out held thousands)."""

        def failed(exc: BaseException) -> None:
            if isinstance(exc, errors.KubeError):
                log.warning(
                    "reconcile of %s/%s failed, a later trigger retries: %s", namespace, name, exc
                )
            else:
                log.error("reconcile of %s/%s failed", namespace, name, exc_info=exc)

        self.keep_posting_context()
        self.queue.request((namespace, name), self._reconcile_job(namespace, name), failed)

    async def reconcile_access(self, namespace: str, name: str) -> granting.Outcome:
        """Reconcile one Registry's access (policy, robots, distributed Secrets)."""
        self.keep_posting_context()
        return await self.access_queue.run((namespace, name), self._access_job(namespace, name))

    def request_access(self, namespace: str, name: str) -> None:
        """Ask for an access reconcile without waiting: what event handlers do. Thousands
        of events in a burst share the one queued run (and cost no task each)."""

        def failed(exc: BaseException) -> None:
            if isinstance(exc, errors.KubeError):
                log.warning(
                    "access of %s/%s failed, a later trigger retries: %s", namespace, name, exc
                )
            else:
                log.error("access of %s/%s failed", namespace, name, exc_info=exc)

        self.keep_posting_context()
        self.access_queue.request((namespace, name), self._access_job(namespace, name), failed)

    def _access_job(
        self, namespace: str, name: str
    ) -> Callable[[], Coroutine[Any, Any, granting.Outcome]]:
        async def job() -> granting.Outcome:
            started = time.monotonic()
            try:
                return await self._access_pass(namespace, name)
            finally:
                ended = time.monotonic()
                self._access_runs[(namespace, name)] = (ended - started, ended)
                if ended - started >= TRIM_AFTER:
                    self._trim_soon()

        return job

    async def _access_pass(self, namespace: str, name: str) -> granting.Outcome:
        """One access pass in a worker thread; its events, wake-ups and timers after."""
        async with self.slots:
            outcome = await asyncio.to_thread(
                granting.reconcile_access,
                self.kube,
                namespace,
                name,
                self.access_options,
                self.claims(),
                self.seen(namespace, name),
                self.namespaces_seen(),
            )
        self.written.update(outcome.written)
        self.statuses.update(outcome.statuses)
        self.interest[(namespace, name)] = outcome.interest
        for ref, event in outcome.events:
            self._post(ref, event)
        self._access_applied(namespace, name, outcome)
        if outcome.requeue_after is not None:
            self.access_later((namespace, name), outcome.requeue_after)
        self._wake(outcome.wake)
        return outcome

    def _access_applied(self, namespace: str, name: str, outcome: granting.Outcome) -> None:
        """The Registry's AccessApplied: one event per transition, and its status follows
        (the Registry's own reconcile writes it, so that one writer owns its status)."""
        key = (namespace, name)
        new = outcome.applied
        if new is None:
            return
        known = self.applied.get(key)
        before: Mapping[str, Any] = (
            dataclasses.asdict(known) if known is not None else outcome.previous_applied
        )
        self.applied[key] = new
        if outcome.registry_ref is not None and (before.get("status"), before.get("reason")) != (
            new.status,
            new.reason,
        ):
            if new.status == "False":
                self._post(outcome.registry_ref, Event("Warning", new.reason, new.message))
            elif before.get("status") == "False":
                self._post(
                    outcome.registry_ref,
                    Event("Normal", "AccessApplied", "the policy is written again"),
                )
        stored = outcome.previous_applied
        if status_.differs(stored, dataclasses.asdict(new)):
            self.spawn(f"reconcile of {namespace}/{name}", self.reconcile(namespace, name))

    def _trim_soon(self) -> None:
        """Trim the heap now, or once TRIM_GAP has passed since the last trim (so that the
        last pass of a burst is followed by one)."""
        if self.trim_heap is None or self._trim_pending is not None:
            return
        trim = self.trim_heap

        def run() -> None:
            self._trim_pending = None
            self._trimmed = time.monotonic()
            self.spawn("heap trim", asyncio.to_thread(trim))

        wait = self._trimmed + TRIM_GAP - time.monotonic()
        if wait <= 0:
            run()
        else:
            self._trim_pending = asyncio.get_running_loop().call_later(wait, run)

    async def sync_hosting(self) -> None:
        """Make kube-public/local-registry-hosting follow the claims (after a deletion)."""
        async with self.slots:
            claims = self.claims()

            def sync() -> reconcile.Hosting:
                found = claims if claims is not None else reconcile.list_claims(self.kube)
                return reconcile.sync_local_registry_hosting(self.kube, found)

            hosting = await asyncio.to_thread(sync)
        self.written.update(hosting.written)
        for key, event in hosting.events:
            if key in hosting.refs:
                self._post(hosting.refs[key], event)

    def forget_registry(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.interest.pop(key, None)
        self.replication.pop(key, None)
        self.usage.pop(key, None)
        self.readiness.pop(key, None)
        self.applied.pop(key, None)
        self.endpoints.remember(namespace, name, None)
        self._access_runs.pop(key, None)
        handle = self._later.pop(key, None)
        if handle is not None:
            handle.cancel()

    # -- triggering without waiting --

    def spawn(self, what: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a reconcile in the background (a wake-up, a namespace event, a claim change)."""

        async def guarded() -> None:
            try:
                await coroutine
            except errors.KubeError as exc:
                log.warning("%s failed, a later trigger retries: %s", what, exc)

        self.keep_posting_context()
        # A context of its own: the caller's (a handler's) would keep its body alive.
        task = asyncio.get_running_loop().create_task(guarded(), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake(self, wake: tuple[Wake, ...]) -> None:
        for kind, namespace, name in wake:
            if kind == "access":
                self.request_access(namespace, name)
            else:
                self.spawn(f"reconcile of {namespace}/{name}", self.reconcile(namespace, name))

    def access_later(self, key: Key, delay: float) -> None:
        """Reconcile access again after `delay` (rotation steps): the earliest request wins."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        handle = self._later.get(key)
        if handle is not None and not handle.cancelled() and handle.when() <= when:
            return
        if handle is not None:
            handle.cancel()

        def fire() -> None:
            self._later.pop(key, None)
            self.request_access(*key)

        self._later[key] = loop.call_at(when, fire)

    # -- the registry servers --

    def _admin(self, namespace: str, name: str) -> tuple[str, str] | None:
        secret = self.kube.find("v1", "Secret", namespace, names.secret(name))
        data = credentials.decode_secret_data((secret or {}).get("data"))
        user, password = data.get(credentials.ADMIN_USERNAME), data.get(credentials.ADMIN_PASSWORD)
        return (user, password) if user and password else None

    def _reach(self, namespace: str, name: str) -> tuple[str, ssl.SSLContext | None]:
        """The server's URL and the TLS context verifying it (None: plain HTTP)."""
        trust = self.endpoints.trust(namespace, name)
        if trust is None:  # no reconcile of it in this process yet
            trust = reconcile.read_trust(self.kube, namespace, name)
            self.endpoints.remember(namespace, name, trust)
        return self.endpoints.url(namespace, name, trust.scheme), trust.context()

    def probe(self, target: access.Target, credential: robots_.Credential) -> str:
        namespace, name = target.owner.namespace, target.owner.name
        url, context = self._reach(namespace, name)
        return fetching.probe(url, self._admin(namespace, name), credential, context)

    def fetch_readiness(self, namespace: str, name: str) -> status_.Readiness:
        return fetching.readiness(*self._reach(namespace, name))

    def usage_of(self, namespace: str, name: str) -> usage_.Observation | None:
        return self.usage.get((namespace, name))

    def fetch_usage(self, namespace: str, name: str) -> usage_.Observation:
        """Every repository's usage on the server, read with the admin credentials."""
        url, context = self._reach(namespace, name)
        previous = self.usage.get((namespace, name))
        return fetching.usage_observation(
            url, self._admin(namespace, name), previous, time.time(), context
        )

    def fetch_replication(self, namespace: str, name: str) -> status_.ReplicationObservation:
        """The server's replication status, read with the registry's admin credentials."""
        admin = self._admin(namespace, name)
        if admin is None:
            return status_.ReplicationObservation(error="the admin credentials are not there yet")
        url, context = self._reach(namespace, name)
        return fetching.replication_status(url, *admin, context)


def _not_older(version: str, than: str) -> bool:
    """Whether resourceVersion `version` is at least `than`. They are opaque strings to
    clients, but etcd's revisions underneath: compare them as numbers when they are."""
    try:
        return int(version) >= int(than)
    except ValueError:
        return version == than


def of(memo: Any) -> Runtime:
    runtime = getattr(memo, "berth", None)
    if not isinstance(runtime, Runtime):
        raise RuntimeError("the operator memo carries no Runtime: start via registry_operator")
    return runtime
