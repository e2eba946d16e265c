"""Access for one registry, end to end: read, plan (`access`), write. Synchronous.

This is the join for Repositories, as `reconcile` is for the Registry's own children:
level-based and idempotent, so every trigger (a Repository or namespace changing, a
distributed Secret edited or deleted, the Registry's own handlers, a rotation falling
due) simply calls `reconcile_access`. Writes are ordered so that no credential that was
handed out stops working early and no new credential is handed out before it is stored:

1. delete the Secrets (and ServiceAccount entries) no longer wanted,
2. store the robots (the operator's record of every credential),
3. write the policy the server reloads,
4. write the Secrets into granted namespaces (in parallel) and patch ServiceAccounts,
5. clear handled `berth.dev/rotate` annotations, write the Repositories' statuses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from registry_operator import (
    API_VERSION,
    access,
    credentials,
    models,
    node_access,
    objects,
    peering,
    reconcile,
    robots,
    status,
)
from registry_operator import usage as usage_
from registry_operator.kube import client as kube_client
from registry_operator.kube import errors
from registry_operator.reconcile import Event, Wake
from registry_operator.rendering import grants, names, policy

# Asks the registry server whether it accepts a credential: access.ACCEPTED, REFUSED
# or UNREACHABLE. The operator's runtime provides it (fetching); tests swap it.
Prober = Callable[[access.Target, robots.Credential], str]
SecretKey = tuple[str, str]  # (namespace, name)
# An event for an object, and whether it tells a Repository's first status.
Told = tuple[Mapping[str, Any], Event, bool]


def _never_reachable(target: access.Target, credential: robots.Credential) -> str:
    return access.UNREACHABLE


@dataclasses.dataclass(frozen=True)
class Options:
    generators: credentials.Generators = dataclasses.field(
        default_factory=lambda: credentials.Generators(hash=robots.hash_secret)
    )
    settings: access.Settings = dataclasses.field(default_factory=access.Settings)
    prober: Prober = _never_reachable
    # Each Registry's usage as its server last reported it (namespace, name); None: unread.
    usage: Callable[[str, str], usage_.Observation | None] = lambda _ns, _name: None
    clock: Callable[[], float] = time.time
    workers: int = 8  # API calls in flight while fanning out Secrets
    # The compressed size a policy shard may reach (rendering.policy.SHARD_BYTES); tests
    # lower it to see a policy split at a size CI can create.
    policy_shard_bytes: int = policy.SHARD_BYTES


@dataclasses.dataclass(frozen=True)
class Interest:
    """Which namespaces the registry's Repositories could grant: the namespace handler
    uses it to decide which registries a namespace event concerns."""

    names: frozenset[str] = frozenset()
    selectors: tuple[models.Selector, ...] = ()
    holding: frozenset[str] = frozenset()  # namespaces holding our Secrets now

    def concerns(self, namespace: str, labels: Mapping[str, str] | None) -> bool:
        if namespace in self.names or namespace in self.holding:
            return True
        return labels is not None and any(s.matches(labels) for s in self.selectors)

    @classmethod
    def of(cls, active: Iterable[models.Repository], holding: Iterable[SecretKey]) -> Interest:
        """Of the Repositories holding their paths, and the Secrets written now. A
        Repository with push access always grants its own namespace."""
        repositories = list(active)
        grants = [g for r in repositories for g in (r.pull, r.push) if g is not None]
        return cls(
            names=frozenset(ns for grant in grants for ns in grant.namespaces)
            | frozenset(r.owner.namespace for r in repositories if r.push is not None),
            selectors=tuple(grant.selector for grant in grants if grant.selector is not None),
            holding=frozenset(ns for ns, _ in holding),
        )


@dataclasses.dataclass(frozen=True)
class Outcome:
    events: tuple[tuple[Mapping[str, Any], Event], ...] = ()  # (object reference, event)
    # (kind, namespace, name) -> resourceVersion our write left, to skip its echo.
    written: Mapping[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)
    requeue_after: float | None = None
    wake: tuple[Wake, ...] = ()
    interest: Interest = dataclasses.field(default_factory=Interest)
    # The Registry's AccessApplied condition (None: no Registry to write access for),
    # and the one its status holds (to tell a transition after a restart).
    applied: status.Condition | None = None
    previous_applied: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    registry_ref: Mapping[str, Any] | None = None  # for events on the Registry
    # (namespace, name) of a Repository -> (resourceVersion, status.essence) of our status
    # write: until the watch brings that version, the status it says is this one.
    statuses: Mapping[tuple[str, str], tuple[str, int]] = dataclasses.field(default_factory=dict)


def reconcile_access(
    kube: kube_client.Client,
    namespace: str,
    name: str,
    options: Options | None = None,
    claims: Sequence[node_access.Claim] | None = None,
    seen: Sequence[Seen] | None = None,
    namespaces: Sequence[access.Namespace] | None = None,
) -> Outcome:
    """`claims` are every Registry's node port claims (the operator's index; listed
    here when None): whether the pull Secrets name the node proxy depends on them.
    `seen` are the registry's Repositories and `namespaces` every namespace, as the
    operator's indexes hold them; listed here when None (tests, a first run)."""
    options = options or Options()
    now = options.clock()
    body = kube.find(API_VERSION, models.KIND, namespace, name)
    if seen is None:
        seen = _list_repositories(kube, namespace, name)
    repositories = [s.repository for s in seen if s.repository is not None]
    invalid = [s for s in seen if s.repository is None]
    previous = {s.owner.name: s for s in seen}
    target, reason = None, ("RegistryNotFound", f"Registry {namespace}/{name} does not exist")
    if body is not None and (body.get("metadata") or {}).get("deletionTimestamp"):
        reason = ("RegistryDeleting", f"Registry {namespace}/{name} is being deleted")
    elif body is not None:
        try:
            registry = models.parse_registry(body)
        except models.InvalidSpec as exc:
            # Leave access as it is: an invalid Registry spec is not a reason to revoke.
            message = f"Registry {namespace}/{name} has an invalid spec: {exc}"
            return _statuses_only(kube, seen, ("RegistryInvalid", message), now, options)
        target = _target(kube, registry, claims)

    robots_secret = (
        kube.find("v1", "Secret", namespace, names.robots_secret(name)) if target else None
    )
    stored = robots.load_all(credentials.decode_secret_data((robots_secret or {}).get("data")))
    probe = None
    newest = access.newest_staged(stored) if target is not None else None
    if target is not None and newest is not None and newest.staged is not None:
        probe = access.Probe(
            newest.staged.name, newest.staged_at or 0.0, options.prober(target, newest.staged)
        )
    if namespaces is None:
        namespaces = [namespace_of(obj) for obj in kube.list("v1", "Namespace", None)]
    plan = access.plan(
        target, repositories, namespaces, stored, now, options.generators, probe, options.settings
    )

    observed = {
        (obj["metadata"]["namespace"], obj["metadata"]["name"]): obj
        for obj in kube.list("v1", "Secret", None, names.access_selector(name, namespace))
    }
    writer = _Writer(kube, options)
    writer.revoke(observed, plan)
    error, not_in_force, applied = None, frozenset[str](), None
    mounted_more = False
    if target is not None and plan.policy is not None:
        stored_policy = {
            obj["metadata"]["name"]: obj
            for obj in kube.list("v1", "Secret", namespace, names.policy_selector(name))
        }
        before = policy.shard_count(stored_policy.get(names.policy_secret(name)))
        error, shards = writer.write_policy(target, plan, robots_secret, stored_policy)
        # Shards past the slots the pods mount: the Deployment must mount more. The
        # Registry's own reconcile renders that; this pass's writes wake nothing.
        mounted_more = error is None and policy.slots(shards) > policy.slots(before)
        applied = access.access_condition(error, shards)
        writable = None
        if error is not None:
            # The policy in force is the stored one: hand out only what it holds, and
            # tell the Repositories whose grants are not in it.
            writable, not_in_force = access.in_force(plan, policy.read_stored(stored_policy, name))
        writer.distribute(target, plan, observed, writable)
    for handled, request in plan.rotations_handled.items():
        writer.clear_rotate_request(namespace, handled, request)

    written = access.Written(
        secrets=frozenset(writer.holding),
        foreign=writer.refused,
        missing_service_accounts=writer.missing_accounts,
        policy_error=error,
        not_in_force=not_in_force,
    )
    statuses: list[tuple[Seen, Mapping[str, Any], Sequence[status.Condition]]] = []
    observed_usage = options.usage(namespace, name) if target is not None else None
    for repository in repositories:
        fields, found = access.repository_status(
            repository, target, plan, written, reason, observed_usage
        )
        statuses.append((previous[repository.owner.name], fields, found))
    statuses += [
        (s, {}, [status.Condition(access.READY, "False", "InvalidSpec", s.invalid)])
        for s in invalid
    ]
    events = _in_bulk(writer.write_statuses(statuses, now), _registry_ref(body))

    # Try again: soon for what resolves itself (an SA about to be created, an API error),
    # rarely for a Secret of someone else's that only a person can move out of the way.
    retry = (
        10.0
        if writer.failed or writer.missing_accounts or error is not None
        else 60.0
        if writer.refused
        else None
    )
    requeue = plan.requeue_after
    if retry is not None:
        requeue = min(requeue or retry, retry)
    # A peer waiting for its account here can now write it into its server config.
    wake: list[Wake] = []
    if target is not None:
        wake = [("registry", *robots.peer_of(key)) for key in target.peers if key not in stored]
        if mounted_more:
            wake.append(("registry", namespace, name))
    return Outcome(
        events=tuple(events),
        written=writer.written,
        statuses=writer.statuses,
        requeue_after=requeue,
        wake=tuple(wake),
        interest=Interest.of(plan.active.values(), writer.holding),
        applied=applied,
        previous_applied=_registry_condition(body, access.ACCESS_APPLIED),
        registry_ref=_registry_ref(body),
    )


# --- reading --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    """A Repository as far as access needs it: parsed (None when the spec is invalid,
    with why), and what its `.status` says (status.essence; None: it has none). Not the
    object, not even the status: with thousands of them the operator keeps these (an
    index). A status about to change is read when it is written (for its times)."""

    owner: models.Owner
    generation: int
    resource_version: str
    repository: models.Repository | None
    invalid: str = ""
    status: int | None = None


def see(body: Mapping[str, Any]) -> tuple[tuple[str, str], Seen] | None:
    """(registry namespace, registry name) and the Repository as seen; None for one that
    names no Registry or is being deleted (it grants nothing any more)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    registry = (spec.get("registryRef") or {}).get("name") if isinstance(spec, Mapping) else None
    if not registry or meta.get("deletionTimestamp"):
        return None
    namespace = str(meta.get("namespace"))
    owner = models.Owner(
        name=str(meta.get("name")),
        namespace=namespace,
        uid=str(meta.get("uid", "")),
        kind=models.REPOSITORY_KIND,
    )
    generation = int(meta.get("generation", 0))
    version = str(meta.get("resourceVersion", ""))
    status_ = status.essence(body["status"]) if body.get("status") else None
    try:
        parsed = models.parse_repository(body)
    except models.InvalidSpec as exc:
        return (namespace, str(registry)), Seen(owner, generation, version, None, str(exc), status_)
    return (namespace, str(registry)), Seen(owner, generation, version, parsed, "", status_)


def _list_repositories(kube: kube_client.Client, namespace: str, registry: str) -> list[Seen]:
    found = []
    for body in kube.list(API_VERSION, models.REPOSITORY_KIND, namespace):
        item = see(body)
        if item is not None and item[0] == (namespace, registry):
            found.append(item[1])
    return found


def namespace_of(obj: Mapping[str, Any]) -> access.Namespace:
    meta = obj.get("metadata") or {}
    phase = (obj.get("status") or {}).get("phase")
    return access.Namespace(
        name=str(meta["name"]),
        labels=dict(meta.get("labels") or {}),
        terminating=bool(meta.get("deletionTimestamp")) or phase == "Terminating",
    )


def _target(
    kube: kube_client.Client,
    registry: models.Registry,
    claims: Sequence[node_access.Claim] | None,
) -> access.Target:
    found = []
    # A loop, not a comprehension: test_install_rbac traces each API call to the
    # function that makes it, and on Python 3.11 a comprehension is a frame of its own.
    for ref in peering.listed(registry):
        found.append((ref, kube.find(API_VERSION, models.KIND, ref.namespace, ref.name)))
    mine = node_access.claim(registry)
    if claims is None:
        claims = reconcile.list_claims(kube) if mine.port is not None else []
    served = node_access.served_port(mine, [c for c in claims if c.ref != mine.ref])
    return access.Target(
        owner=registry.owner,
        hosts=node_access.pull_hosts(registry, served),
        admins=(credentials.ADMIN_USER, credentials.REPLICATION_USER),
        peers=peering.consenting(registry, found),
    )


def _registry_condition(body: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any]:
    return status.condition_of((body or {}).get("status") or {}, type_)


def _registry_ref(body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if body is None:
        return None
    meta = body.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": models.KIND,
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
    }


# --- writing --------------------------------------------------------------------------------


def _name(manifest: Mapping[str, Any]) -> str:
    return str(manifest["metadata"]["name"])


def _split(value: str | None) -> list[str]:
    return [item for item in (value or "").split(",") if item]


def _recorded_accounts(secret: Mapping[str, Any] | None) -> list[str]:
    """The ServiceAccounts a Secret's annotation says it was added to. Anyone who may
    edit Secrets in the namespace may edit it: what cannot name an account is ignored
    (found by review: "x/y" there made every access pass of the Registry fail)."""
    annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
    listed = _split(annotations.get(names.SERVICE_ACCOUNTS_ANNOTATION))
    return [account for account in listed if models.is_object_name(account)]


class _Writer:
    """The writes of one access reconcile, and what they achieved."""

    def __init__(self, kube: kube_client.Client, options: Options) -> None:
        self.kube = kube
        self.options = options
        self.written: dict[tuple[str, str, str], str] = {}
        self.holding: set[SecretKey] = set()  # Secrets holding the current credential
        self.refused: dict[SecretKey, str] = {}  # not written, and why
        self.failed: set[SecretKey] = set()  # of those, the ones an API error stopped
        self.missing_accounts: dict[SecretKey, tuple[str, ...]] = {}
        self.statuses: dict[tuple[str, str], tuple[str, int]] = {}

    def _record(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.written[(str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))] = (
            str(meta.get("resourceVersion", ""))
        )

    def _parallel(self, jobs: Sequence[Callable[[], None]]) -> None:
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.options.workers) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()

    # -- Secrets outside the registry's namespace --

    def revoke(self, observed: Mapping[SecretKey, Mapping[str, Any]], plan: access.Plan) -> None:
        """Delete what the plan no longer wants, after taking it out of ServiceAccounts."""
        gone = [key for key in observed if key not in plan.secrets]

        def job(key: SecretKey) -> Callable[[], None]:
            def run() -> None:
                for account in _recorded_accounts(observed[key]):
                    # Refused, the entry stays (it names a Secret about to be gone:
                    # harmless); the Secret goes all the same.
                    self._account_of(key, account, add=(), remove=(key[1],))
                try:
                    self._delete_secret(*key)
                except errors.KubeError as exc:
                    self._failed(key, f"could not be deleted: {exc.message}")

            return run

        self._parallel([job(key) for key in gone])

    def distribute(
        self,
        target: access.Target,
        plan: access.Plan,
        observed: Mapping[SecretKey, Mapping[str, Any]],
        writable: frozenset[SecretKey] | None = None,
    ) -> None:
        """Write the planned Secrets; with `writable`, only those (the others' credential
        is not in the policy in force: handing it out would fail every pull)."""

        def job(key: SecretKey, desired: access.Desired) -> Callable[[], None]:
            def run() -> None:
                robot = plan.robots[desired.robot]
                paths = tuple(
                    sorted({plan.active[r].path for r in desired.repositories if r in plan.active})
                )
                manifest = grants.access_secret(target, desired, robot.current, paths)
                before = observed.get(key)
                recorded = _recorded_accounts(before)
                for account in sorted(set(recorded) - set(desired.service_accounts)):
                    self._account_of(key, account, add=(), remove=(key[1],))
                if not self._write_secret(key, manifest, before):
                    return
                missing = []
                for account in desired.service_accounts:
                    if not self._account_of(key, account, add=(key[1],), remove=()):
                        missing.append(account)
                if missing:
                    self.missing_accounts[key] = tuple(missing)

            return run

        self._parallel(
            [
                job(key, desired)
                for key, desired in sorted(plan.secrets.items())
                if writable is None or key in writable
            ]
        )

    def write_policy(
        self,
        target: access.Target,
        plan: access.Plan,
        robots_secret: Mapping[str, Any] | None,
        stored: Mapping[str, Mapping[str, Any]],
    ) -> tuple[str | None, int]:
        """Store the robots, then the policy's shards, then its main file; remove shards
        no longer listed. Returns why it failed (None: written) and the shard count.

        The robots first: a credential in the policy must never be one the operator
        could lose. The main file last: it names the shards by digest, so the server
        applies nothing before all of them are there.
        """
        assert plan.policy is not None
        owner = target.owner
        main = stored.get(names.policy_secret(owner.name))
        rendered = policy.render(
            owner, plan.policy, policy.shard_count(main), self.options.policy_shard_bytes
        )
        wanted = policy.secrets(owner, rendered)
        try:
            self.apply_owned(grants.robots_secret(owner, plan.robots), robots_secret)
        except errors.KubeError as exc:
            return f"Secret {names.robots_secret(owner.name)}: {exc.message}", len(rendered.shards)
        try:
            self._parallel(
                [
                    functools.partial(self.apply_owned, manifest, stored.get(_name(manifest)))
                    for manifest in wanted[:-1]
                ]
            )
            self.apply_owned(wanted[-1], main)
        except errors.KubeError as exc:
            return f"the policy Secrets: {exc.message}", len(rendered.shards)
        keep = {_name(m) for m in wanted}
        for secret in stored:
            if secret not in keep:  # shards the main file no longer lists
                try:
                    self._delete_secret(owner.namespace, secret)
                except errors.KubeError:  # harmless left over: the next pass, soon
                    self.failed.add((owner.namespace, secret))
        return None, len(rendered.shards)

    def _delete_secret(self, namespace: str, name: str) -> None:
        self.kube.delete("v1", "Secret", namespace, name)  # gone already is fine

    def _write_secret(
        self, key: SecretKey, manifest: Mapping[str, Any], before: Mapping[str, Any] | None
    ) -> bool:
        try:
            if before is None:
                try:
                    self._record(self.kube.create(manifest))
                except errors.Conflict:
                    self.refused[key] = "a Secret of that name exists and Berth does not manage it"
                    return False
            elif before.get("type") != manifest["type"]:
                # The type of a Secret cannot change: replace it.
                self.kube.delete("v1", "Secret", key[0], key[1])
                self._record(self.kube.create(manifest))
            elif not (
                before.get("data") == manifest["data"]
                and objects.contains(
                    before.get("metadata"),
                    {
                        "labels": manifest["metadata"]["labels"],
                        "annotations": manifest["metadata"]["annotations"],
                    },
                )
            ):
                self._record(self.kube.apply(manifest))
        except (errors.Rejected, errors.Retryable, errors.NotFound, errors.Conflict) as exc:
            # A namespace being deleted refuses new objects (403); the next pass retries.
            self.refused[key] = exc.message
            self.failed.add(key)
            return False
        self.holding.add(key)
        return True

    def _failed(self, key: SecretKey, why: str) -> None:
        """An API error stopped a write for the Secret ``key``: said in the status of the
        Repositories wanting it, tried again soon; the rest of the pass goes on."""
        self.refused[key] = why
        self.failed.add(key)

    def _account_of(
        self, key: SecretKey, account: str, add: Sequence[str], remove: Sequence[str]
    ) -> bool:
        """``_service_account`` for the Secret ``key``: an API error (a webhook refusing
        the change, an account changing all the time) is recorded for the Secret instead
        of stopping every other namespace's grants and revocations. False: no account."""
        try:
            return self._service_account(key[0], account, add, remove)
        except errors.KubeError as exc:
            self._failed(key, f"ServiceAccount {key[0]}/{account} not updated: {exc.message}")
            return True
        except ValueError as exc:  # a name no API path takes
            self._failed(key, f"ServiceAccount {key[0]}/{account[:80]}: {exc}")
            return True

    def _service_account(
        self, namespace: str, name: str, add: Sequence[str], remove: Sequence[str]
    ) -> bool:
        """Add/remove imagePullSecrets entries; never touch entries Berth did not add.

        imagePullSecrets is an atomic list (server-side apply would replace it whole),
        so this is a read-modify-write guarded by the resourceVersion. The entries Berth
        added are listed in an annotation on the ServiceAccount. False: it does not exist.
        """
        for _ in range(5):
            account = self.kube.find("v1", "ServiceAccount", namespace, name)
            if account is None:
                return False
            meta = account.get("metadata") or {}
            current = [e.get("name") for e in account.get("imagePullSecrets") or []]
            added = set(
                _split((meta.get("annotations") or {}).get(names.ADDED_PULL_SECRETS_ANNOTATION))
            )
            entries = list(current)
            for secret in add:
                if secret not in entries:
                    entries.append(secret)
                    added.add(secret)
            for secret in remove:
                if secret in added:
                    added.discard(secret)
                    entries = [e for e in entries if e != secret]
            annotation = ",".join(sorted(added)) or None
            if entries == current and annotation == (meta.get("annotations") or {}).get(
                names.ADDED_PULL_SECRETS_ANNOTATION
            ):
                return True
            patch = {
                "metadata": {
                    "resourceVersion": meta.get("resourceVersion"),
                    "annotations": {names.ADDED_PULL_SECRETS_ANNOTATION: annotation},
                },
                "imagePullSecrets": [{"name": e} for e in entries],
            }
            try:
                self.kube.patch("v1", "ServiceAccount", namespace, name, patch)
                return True
            except errors.Conflict:
                continue  # changed meanwhile: read again
            except errors.NotFound:
                return False
        raise errors.Retryable(f"ServiceAccount {namespace}/{name} keeps changing")

    # -- the registry's own Secrets, the Repositories --

    def apply_owned(self, manifest: Mapping[str, Any], before: Mapping[str, Any] | None) -> None:
        if (
            before is not None
            and before.get("data") == manifest["data"]
            and objects.contains(before.get("metadata"), {"labels": manifest["metadata"]["labels"]})
        ):
            return
        self._record(self.kube.apply(manifest))

    def clear_rotate_request(self, namespace: str, repository: str, request: str) -> None:
        """Remove the handled annotation, unless it was set again meanwhile."""
        path = "/metadata/annotations/" + models.ROTATE_ANNOTATION.replace("~", "~0").replace(
            "/", "~1"
        )
        patch = [{"op": "test", "path": path, "value": request}, {"op": "remove", "path": path}]
        # Changed or gone meanwhile: the next pass sees the new value.
        with contextlib.suppress(errors.Rejected, errors.NotFound, errors.Conflict):
            self.kube.patch(
                API_VERSION,
                models.REPOSITORY_KIND,
                namespace,
                repository,
                patch,
                content_type=kube_client.JSON_PATCH,
            )

    def write_statuses(
        self,
        statuses: Sequence[tuple[Seen, Mapping[str, Any], Sequence[status.Condition]]],
        now: float,
    ) -> list[Told]:
        """Write the statuses that say something new (in parallel); the events, in order.
        Most say what they said: those are told apart by their essence, without a call."""
        changed = [
            item
            for item in statuses
            if item[0].status is None
            or status.essence_of(item[1], item[2], item[0].generation) != item[0].status
        ]
        results: list[list[Told]] = [[] for _ in changed]
        stamp = status.rfc3339(now)

        def job(i: int, seen: Seen, fields: Mapping[str, Any], found: Any) -> Callable[[], None]:
            def run() -> None:
                results[i] = self.write_status(seen, fields, found, stamp)

            return run

        self._parallel([job(i, *item) for i, item in enumerate(changed)])
        return [event for events in results for event in events]

    def write_status(
        self,
        seen: Seen,
        fields: Mapping[str, Any],
        found: Sequence[status.Condition],
        stamp: str,
    ) -> list[Told]:
        owner, generation = seen.owner, seen.generation
        previous: Mapping[str, Any] = {}
        if seen.status is not None:
            # Its conditions' times and what it said before (for the events).
            body = self.kube.find(API_VERSION, models.REPOSITORY_KIND, owner.namespace, owner.name)
            if body is None:
                return []
            previous = body.get("status") or {}
        new = {
            **fields,
            "observedGeneration": generation,
            "conditions": status.render_conditions(
                found, previous.get("conditions") or [], generation, stamp
            ),
        }
        ref = {
            "apiVersion": API_VERSION,
            "kind": models.REPOSITORY_KIND,
            "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
        }
        if dict(previous) != new:
            try:
                after = self.kube.apply(
                    {
                        "apiVersion": API_VERSION,
                        "kind": models.REPOSITORY_KIND,
                        "metadata": {"name": owner.name, "namespace": owner.namespace},
                        "status": new,
                    },
                    subresource="status",
                )
            except errors.NotFound:
                return []
            self._record(after)
            version = str((after.get("metadata") or {}).get("resourceVersion", ""))
            self.statuses[(owner.namespace, owner.name)] = (version, status.essence(new))
        first = not previous  # its first status
        return [(ref, event, first) for event in _repository_events(previous, new)]


def _statuses_only(
    kube: kube_client.Client,
    seen: Sequence[Seen],
    reason: tuple[str, str],
    now: float,
    options: Options,
) -> Outcome:
    writer = _Writer(kube, options)
    statuses: list[tuple[Seen, Mapping[str, Any], list[status.Condition]]] = []
    for item in seen:
        if item.repository is None:
            found = [status.Condition(access.READY, "False", "InvalidSpec", item.invalid)]
            statuses.append((item, {}, found))
            continue
        # Keep what was granted: only the condition changes (rare: read the status).
        body = kube.find(API_VERSION, models.REPOSITORY_KIND, item.owner.namespace, item.owner.name)
        previous = (body or {}).get("status") or {}
        fields = {
            k: v for k, v in previous.items() if k not in ("conditions", "observedGeneration")
        }
        statuses.append((item, fields, [status.Condition(access.READY, "False", *reason)]))
    events = [(ref, event) for ref, event, _ in writer.write_statuses(statuses, now)]
    return Outcome(events=tuple(events), written=writer.written, statuses=writer.statuses)


# More first grants than this in one pass (Repositories created in bulk) are told by one
# event on the Registry instead of one on each: every Event is a write to the API server
# the Repositories' statuses are waiting for, and the statuses say it already.
BULK_GRANTS = 50


def _in_bulk(
    told: Sequence[tuple[Mapping[str, Any], Event, bool]], registry: Mapping[str, Any] | None
) -> list[tuple[Mapping[str, Any], Event]]:
    """The events to post. `told` marks the Granted events of Repositories that had no
    status yet (their first grant): more than BULK_GRANTS of those are folded into one
    event on the Registry. Every other event (revocations, rotations, Warnings) is
    posted on its own Repository."""
    first = sorted(
        {str(ref["metadata"]["name"]) for ref, e, new in told if new and e.reason == "Granted"}
    )
    if len(first) <= BULK_GRANTS or registry is None:
        return [(ref, e) for ref, e, _ in told]
    summary = Event(
        "Normal",
        "Granted",
        f"first pull/push Secrets written for {len(first)} new Repositories:"
        f" {_summary(first, 5)} (in bulk: not told on each)",
    )
    kept = [(ref, e) for ref, e, new in told if not (new and e.reason == "Granted")]
    return [*kept, (registry, summary)]


def _summary(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _repository_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """What an admin should see: grants, revocations, rotations, conflicts."""
    found = []
    for field, mode in (("pullSecretNamespaces", "pull"), ("pushSecretNamespaces", "push")):
        before, after = set(previous.get(field) or []), set(new.get(field) or [])
        if after - before:
            found.append(
                Event(
                    "Normal",
                    "Granted",
                    f"{mode} Secret written to {_summary(sorted(after - before))}",
                )
            )
        if before - after:
            found.append(
                Event(
                    "Normal",
                    "Revoked",
                    f"{mode} Secret removed from {_summary(sorted(before - after))}",
                )
            )
    rotated = new.get("credentialsRotatedAt")
    if previous.get("credentialsRotatedAt") and rotated != previous.get("credentialsRotatedAt"):
        found.append(Event("Normal", "Rotated", f"new credentials handed out at {rotated}"))
    old, ready = status.condition_of(previous, access.READY), status.condition_of(new, access.READY)
    if ready.get("status") == "False" and status.differs(old, ready):
        found.append(Event("Warning", str(ready.get("reason")), str(ready.get("message", ""))))
    conflict = status.condition_of(new, access.PATH_CONFLICT)
    before_conflict = status.condition_of(previous, access.PATH_CONFLICT)
    if conflict.get("reason") == "KeepsPath" and before_conflict.get("message") != conflict.get(
        "message"
    ):
        found.append(Event("Warning", "PathConflict", str(conflict.get("message", ""))))
    return found
