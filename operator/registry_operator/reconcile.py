"""Desired versus observed for one Registry: the one place joining rendering and kube.

Level-based and idempotent: every call reads the Registry afresh, renders all children,
applies them server-side and writes the status. Calling it again changes nothing, so
any trigger (create, update, restart, a child's watch event, the resync poll) may call
it, and an operator killed in the middle simply runs it again.
Synchronous (the kube client is); the handlers run it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from registry_operator import (
    API_VERSION,
    backends,
    credentials,
    fetching,
    models,
    node_access,
    objects,
    peering,
    rendering,
    serving_tls,
    status,
)
from registry_operator.kube import client as kube_client
from registry_operator.kube import errors
from registry_operator.rendering import manifests, names, policy

# Kinds that exist only for some specs and are deleted when the spec drops them.
# PersistentVolumeClaims are deliberately absent: data is never deleted implicitly.
PRUNABLE = (
    ("networking.k8s.io/v1", "Ingress", names.ingress),
    ("policy/v1", "PodDisruptionBudget", names.disruption_budget),
    ("v1", "Secret", names.replication_secret),
    ("apps/v1", "DaemonSet", names.node_proxy),
    ("v1", "Secret", names.serving_secret),  # spec.tls Generated only
    ("v1", "Secret", names.serving_ca_secret),
)

# What another reconcile should run after this one: ("registry" | "access", namespace, name).
Wake = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # "Normal" or "Warning"
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened; `ref` is None when the Registry is gone (nothing to report on)."""

    ref: Mapping[str, Any] | None = None
    events: tuple[Event, ...] = ()
    new_status: Mapping[str, Any] | None = None
    failure: status.Failure | None = None  # set when retrying cannot help
    # (kind, namespace, name) -> resourceVersion of each object as our write left it.
    written: Mapping[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)
    wake: tuple[Wake, ...] = ()
    # Events for other objects (another Registry now named in local-registry-hosting).
    elsewhere: tuple[tuple[Mapping[str, Any], Event], ...] = ()
    trust: fetching.Trust | None = None  # how the operator is to reach the server


@dataclasses.dataclass
class Told:
    """Events as a reconcile makes them, for the caller to post even if it fails part-way
    (a child already recreated is worth telling although a later apply failed)."""

    ref: Mapping[str, Any] | None = None
    events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Options:
    image: str | None = None  # the default server image; None = this package's version
    generators: credentials.Generators = dataclasses.field(default_factory=credentials.Generators)
    now: Callable[[], str] = lambda: status.rfc3339(time.time())
    # The clock certificates are issued and checked by (tests move it).
    moment: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)


def reconcile(
    kube: kube_client.Client,
    namespace: str,
    name: str,
    options: Options | None = None,
    replication: status.ReplicationObservation | None = None,
    told: Told | None = None,
    claims: Sequence[node_access.Claim] | None = None,
    access: status.Condition | None = None,
    readiness: status.Readiness | None = None,
    peer_lists: Sequence[Mapping[str, Any]] | None = None,
) -> Outcome:
    """`replication` is the last answer of the server's replication status endpoint;
    `told` receives the events as they are made (see Told); `claims` are every
    Registry's node port claims (the operator's index; listed here when None);
    `peer_lists` every Registry's name and peers (`peering.peers_stub`, the operator's
    index; listed here when None, after a spec change);
    `access` the access reconcile's AccessApplied (None: keep the one in the status);
    `readiness` the server's last /readyz answer (Registries on S3 or PostgreSQL)."""
    options = options or Options()
    told = told if told is not None else Told()
    body = kube.find(API_VERSION, models.KIND, namespace, name)
    if body is None:
        return Outcome()
    meta = body.get("metadata") or {}
    ref = _registry_ref(namespace, name, meta.get("uid", ""))
    if meta.get("deletionTimestamp"):
        return Outcome(ref=ref)  # the garbage collector takes it from here
    previous = body.get("status") or {}
    try:
        registry = models.parse_registry(body, image=options.image)
    except models.InvalidSpec as exc:
        return _invalid(kube, body, ref, previous, exc, options)

    told.ref = ref
    events = told.events
    drift = previous.get("observedGeneration") == registry.generation
    wired, peers, wake = _resolve_peers(kube, registry)
    if not drift:
        wake.extend(_peers_to_tell(kube, registry, peer_lists))
    me = node_access.claim(registry)
    everyone = [
        c for c in (claims if claims is not None else list_claims(kube)) if c.ref != me.ref
    ] + [me]
    clash = node_access.conflict(me, everyone)
    served = node_access.served_port(me, everyone)
    # A proxy that appears because an older Registry gave up the port is new, not restored.
    proxy_drift = drift and previous.get("pullEndpoint") is not None
    mounted = backends.check(registry.spec, _reader(kube, namespace))
    tls = _plan_tls(kube, registry, options)
    events.extend(Event(*told_) for told_ in tls.events)
    applied, failure = _apply_children(
        kube,
        registry,
        wired,
        (drift, proxy_drift),
        events,
        options,
        served,
        mounted.digest,
        tls.material,
    )
    _prune(kube, registry, applied, events)
    hosting = sync_local_registry_hosting(kube, everyone)
    events.extend(event for key, event in hosting.events if key == me.ref)
    owner = registry.owner
    observed = status.Observed(
        deployment=applied.get(("Deployment", names.deployment(owner.name))),
        pvc=applied.get(("PersistentVolumeClaim", names.pvc(owner.name))),
    )
    new_status = status.build(
        registry.owner,
        registry.generation,
        registry.spec,
        observed,
        previous,
        options.now(),
        failure,
        peers=peers,
        replication=replication,
        pull_endpoint=None if served is None else names.node_host(served),
        node_port_conflict=None if clash is None else node_access.conflict_message(me, clash),
        access=access,
        backends=status.Backends(mounted.problems, readiness, backends.external(registry.spec)),
        tls=(
            tls.report,
            None
            if tls.condition is None
            else status.Condition(serving_tls.CONDITION, *tls.condition),
        ),
    )
    _write_status(kube, namespace, name, previous, new_status)
    events.extend(_transition_events(previous, new_status))
    written = {
        (kind, namespace, obj["metadata"]["name"]): str(obj["metadata"].get("resourceVersion", ""))
        for (kind, _), obj in applied.items()
    }
    written.update(hosting.written)
    return Outcome(
        ref=ref,
        events=tuple(events),
        new_status=new_status,
        failure=failure,
        written=written,
        wake=tuple(wake),
        elsewhere=tuple(
            (hosting.refs[key], event)
            for key, event in hosting.events
            if key != me.ref and key in hosting.refs
        ),
        trust=fetching.Trust(registry.spec.scheme, tls.ca_pem),
    )


def _plan_tls(
    kube: kube_client.Client, registry: models.Registry, options: Options
) -> serving_tls.Plan:
    spec, owner = registry.spec, registry.owner
    if not spec.tls.enabled:
        return serving_tls.Plan()
    if spec.tls.secret_name is not None:
        ca_data = None
        serving = _secret_or_none(kube, owner.namespace, spec.tls.secret_name)
    else:
        ca_data = _secret_or_none(kube, owner.namespace, names.serving_ca_secret(owner.name))
        serving = _secret_or_none(kube, owner.namespace, names.serving_secret(owner.name))
    return serving_tls.plan(spec, owner, ca_data, serving, options.moment())


def read_trust(kube: kube_client.Client, namespace: str, name: str) -> fetching.Trust:
    """How to reach a Registry's server, read from the API server (the reconcile's
    Outcome says it without asking again)."""
    body = kube.find(API_VERSION, models.KIND, namespace, name)
    try:
        spec = models.parse_registry(body).spec if body is not None else None
    except models.InvalidSpec:
        spec = None
    if spec is None:
        return fetching.Trust()
    return fetching.Trust(spec.scheme, trusted_ca(kube, spec, namespace, name))


def trusted_ca(
    kube: kube_client.Client, spec: models.Spec, namespace: str, name: str
) -> str | None:
    """The CA clients are to verify a Registry's server with, read from its serving
    Secret (ours or the user's); None: plain HTTP, or no CA there (yet)."""
    if not spec.tls.enabled:
        return None
    secret = spec.tls.secret_name or names.serving_secret(name)
    return (_secret_or_none(kube, namespace, secret) or {}).get(manifests.TLS_CA_FILE) or None


def list_claims(kube: kube_client.Client) -> list[node_access.Claim]:
    """Every Registry's node port claim, read from the API server."""
    found = (node_access.claim_of(body) for body in kube.list(API_VERSION, models.KIND, None))
    return [claim for claim in found if claim is not None]


@dataclasses.dataclass(frozen=True)
class Hosting:
    """What syncing kube-public/local-registry-hosting did."""

    chosen: node_access.Claim | None = None
    events: tuple[tuple[str, Event], ...] = ()  # ("namespace/name" of a Registry, event)
    refs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    written: Mapping[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)


def _registry_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": models.KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
    }


def sync_local_registry_hosting(
    kube: kube_client.Client, claims: Sequence[node_access.Claim]
) -> Hosting:
    """Make kube-public/local-registry-hosting (KEP-1755) name the Registry
    `node_access.hosting` chooses, or delete it when none qualifies. Cluster-wide and
    idempotent: any Registry's reconcile (and a deletion) may call it. A ConfigMap of
    that name that Berth did not write (kind's, a cluster tool's) is left alone."""
    chosen = node_access.hosting(claims)
    namespace, name = names.LOCAL_REGISTRY_HOSTING_NAMESPACE, names.LOCAL_REGISTRY_HOSTING
    current = kube.find("v1", "ConfigMap", namespace, name)
    labels = ((current or {}).get("metadata") or {}).get("labels") or {}
    if current is not None and labels.get(names.MANAGED_BY_LABEL) != names.MANAGED_BY:
        return Hosting(chosen)
    before = (
        f"{labels.get(names.REGISTRY_NAMESPACE_LABEL)}/{labels.get(names.REGISTRY_LABEL)}"
        if current is not None
        else None
    )
    refs = {c.ref: _registry_ref(c.namespace, c.name, c.uid) for c in claims}
    where = f"ConfigMap {namespace}/{name}"
    if chosen is None:
        if current is None:
            return Hosting()
        kube.delete("v1", "ConfigMap", namespace, name)
        told = [] if before is None else [(before, Event("Normal", "Deleted", f"deleted {where}"))]
        return Hosting(None, tuple(told), refs)
    assert chosen.port is not None  # hosting() only chooses Registries with a proxy
    desired = manifests.local_registry_hosting(
        chosen.name, chosen.namespace, chosen.port, chosen.ingress_host
    )
    if current is not None and objects.contains(current, desired):
        return Hosting(chosen, (), refs)
    after = kube.apply(desired)
    message = f"{where} names this Registry ({names.node_host(chosen.port)})"
    told = [(chosen.ref, Event("Normal", "Published", message))]
    if before is not None and before != chosen.ref:
        told.append(
            (before, Event("Normal", "Unpublished", f"{where} names Registry {chosen.ref} now"))
        )
    version = str((after.get("metadata") or {}).get("resourceVersion", ""))
    return Hosting(chosen, tuple(told), refs, {("ConfigMap", namespace, name): version})


def _peers_to_tell(
    kube: kube_client.Client,
    registry: models.Registry,
    everyone: Sequence[Mapping[str, Any]] | None = None,
) -> list[Wake]:
    if everyone is None:
        # Without the index: every Registry, read whole (at a thousand Registries, a
        # list of megabytes at each of their spec changes).
        everyone = kube.list(API_VERSION, models.KIND, None)
    return [
        (kind, ref.namespace, ref.name)
        for ref in peering.to_tell(registry, everyone)
        for kind in ("registry", "access")
    ]


def _resolve_peers(
    kube: kube_client.Client, registry: models.Registry
) -> tuple[manifests.Replication, list[status.PeerState], list[Wake]]:
    """Which peers can be written into the server config, and why the others cannot
    (`peering` decides). A peer's robots Secret is read only once its Registry consents."""
    owner = registry.owner
    resolved: list[peering.Resolved] = []
    for peer in registry.spec.peers:
        ref = peer.registry
        if ref is None:
            assert peer.credentials_secret is not None
            secret = _secret_data(kube, owner.namespace, peer.credentials_secret)
            resolved.append(peering.by_url(peer, secret))
            continue
        body = kube.find(API_VERSION, models.KIND, ref.namespace, ref.name)
        refused = peering.refusal(registry, peer, body)
        if refused is not None:
            resolved.append(refused)
            continue
        peer_robots = _secret_data(kube, ref.namespace, names.robots_secret(ref.name))
        assert body is not None  # refusal() said it exists, and parsed it
        peer_spec = models.parse_registry(body).spec
        peer_ca = trusted_ca(kube, peer_spec, ref.namespace, ref.name)
        resolved.append(peering.in_cluster(registry, peer, peer_robots, peer_spec.scheme, peer_ca))
    wiring = peering.wiring(resolved)
    wake: list[Wake] = [("access", ref.namespace, ref.name) for ref in wiring.waiting_on]
    return wiring.replication, list(wiring.states), wake


def _secret_or_none(kube: kube_client.Client, namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's decoded data; None when it does not exist."""
    secret = kube.find("v1", "Secret", namespace, name)
    return None if secret is None else credentials.decode_secret_data(secret.get("data"))


def _secret_data(kube: kube_client.Client, namespace: str, name: str) -> dict[str, str]:
    """A Secret's decoded data; {} when it does not exist."""
    secret = kube.find("v1", "Secret", namespace, name)
    return credentials.decode_secret_data((secret or {}).get("data"))


def _reader(kube: kube_client.Client, namespace: str) -> backends.Reader:
    """The data of the user's Secrets and ConfigMaps in `namespace`, decoded."""

    def read(kind: str, name: str) -> Mapping[str, str] | None:
        found = kube.find("v1", kind, namespace, name)
        if found is None:
            return None
        if kind == "Secret":
            return credentials.decode_secret_data(found.get("data"))
        return {str(k): str(v) for k, v in (found.get("data") or {}).items()}

    return read


def _apply_children(
    kube: kube_client.Client,
    registry: models.Registry,
    replication: manifests.Replication,
    drifts: tuple[bool, bool],  # (for the Registry's children, for its node proxy)
    events: list[Event],
    options: Options,
    node_port: int | None,
    backend_digest: str = "",
    serving: manifests.ServingSecrets | None = None,
) -> tuple[dict[tuple[str, str], dict[str, Any]], status.Failure | None]:
    owner = registry.owner
    secret = kube.find("v1", "Secret", owner.namespace, names.secret(owner.name))
    creds, generated = credentials.load_or_generate(
        credentials.decode_secret_data((secret or {}).get("data")), options.generators
    )
    if generated:
        events.append(
            Event(
                "Normal",
                "CredentialsGenerated",
                f"generated {', '.join(generated)} in Secret {names.secret(owner.name)}",
            )
        )
    # As many shard Secrets mounted as the access reconcile has written (at least the slots).
    policy_main = kube.find("v1", "Secret", owner.namespace, names.policy_secret(owner.name))
    slots = policy.slots(policy.shard_count(policy_main))
    applied: dict[tuple[str, str], dict[str, Any]] = {}
    failure = None
    certificates = {
        ("Secret", names.serving_secret(owner.name)),
        ("Secret", names.serving_ca_secret(owner.name)),
    }
    rendered = rendering.render(
        registry.spec, owner, creds, replication, node_port, slots, backend_digest, serving
    )
    for manifest in rendered:
        kind, child = manifest["kind"], manifest["metadata"]["name"]
        before = (
            secret
            if (kind, child) == ("Secret", names.secret(owner.name))
            else kube.find(manifest["apiVersion"], kind, owner.namespace, child)
        )
        try:
            after = kube.apply(manifest)
        except errors.Rejected as exc:
            # Keep going: one refused child (say, a PVC that cannot shrink) should not
            # stop the others from converging.
            failure = status.Failure("ApplyRejected", f"{kind} {child}: {exc.message}")
            continue
        applied[(kind, child)] = after
        drift = drifts[1] if kind == "DaemonSet" else drifts[0]
        if (kind, child) in certificates and before is not None and _uid(before) == _uid(after):
            continue  # a new certificate or CA: serving_tls's event says why, not "Repaired"
        events.extend(_change_events(kind, child, before, after, manifest, drift))
    return applied, failure


def _change_events(
    kind: str,
    name: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any],
    desired: Mapping[str, Any],
    drift: bool,
) -> list[Event]:
    if before is None or _uid(before) != _uid(after):  # a new uid: deleted meanwhile
        if drift:
            return [Event("Normal", "Restored", f"recreated {kind} {name}, which was deleted")]
        return [Event("Normal", "Created", f"created {kind} {name}")]
    old = (before.get("metadata") or {}).get("resourceVersion")
    new = (after.get("metadata") or {}).get("resourceVersion")
    # A new resourceVersion alone may be a controller's status write racing ours.
    if old == new or (objects.contains(before, desired) and not _edited_meanwhile(before, after)):
        return []
    if drift:
        return [Event("Normal", "Repaired", f"reverted changes made to {kind} {name}")]
    return [Event("Normal", "Updated", f"updated {kind} {name}")]


def _uid(obj: Mapping[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("uid")


def _edited_meanwhile(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether someone changed the spec between our read and our apply (which then
    reverted it): the generation moved although our apply alone would not move it.
    Watch events often start a reconcile just before a hand edit lands."""
    old = (before.get("metadata") or {}).get("generation")
    new = (after.get("metadata") or {}).get("generation")
    return isinstance(old, int) and isinstance(new, int) and new > old


def _prune(
    kube: kube_client.Client,
    registry: models.Registry,
    applied: Mapping[tuple[str, str], Any],
    events: list[Event],
) -> None:
    owner = registry.owner
    for api_version, kind, name_of in PRUNABLE:
        name = name_of(owner.name)
        if (kind, name) in applied:
            continue
        found = kube.find(api_version, kind, owner.namespace, name)
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        if found is not None and labels.get(names.REGISTRY_LABEL) == owner.name:
            kube.delete(api_version, kind, owner.namespace, name)
            events.append(Event("Normal", "Deleted", f"deleted {kind} {name}"))


def _invalid(
    kube: kube_client.Client,
    body: Mapping[str, Any],
    ref: Mapping[str, Any],
    previous: Mapping[str, Any],
    exc: models.InvalidSpec,
    options: Options,
) -> Outcome:
    meta = body["metadata"]
    owner = models.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""))
    observed = status.Observed(
        deployment=kube.find(
            "apps/v1", "Deployment", owner.namespace, names.deployment(owner.name)
        ),
        pvc=kube.find("v1", "PersistentVolumeClaim", owner.namespace, names.pvc(owner.name)),
    )
    failure = status.Failure("InvalidSpec", str(exc))
    new_status = status.build(
        owner, int(meta.get("generation", 0)), None, observed, previous, options.now(), failure
    )
    _write_status(kube, owner.namespace, owner.name, previous, new_status)
    return Outcome(
        ref=ref,
        events=tuple(_transition_events(previous, new_status)),
        new_status=new_status,
        failure=failure,
    )


def _write_status(
    kube: kube_client.Client,
    namespace: str,
    name: str,
    previous: Mapping[str, Any],
    new: Mapping[str, Any],
) -> None:
    if dict(previous) == dict(new):
        return
    try:
        kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": models.KIND,
                "metadata": {"name": name, "namespace": namespace},
                "status": dict(new),
            },
            subresource="status",
        )
    except errors.NotFound:
        return  # deleted meanwhile


def _transition_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for what an admin should notice: becoming ready, degrading, recovering."""
    found = []
    was_ready = status.condition_of(previous, status.READY)
    ready = status.condition_of(new, status.READY)
    if ready.get("status") == "True" and was_ready.get("status") != "True":
        found.append(Event("Normal", "Ready", str(ready.get("message", ""))))
    old = status.condition_of(previous, status.DEGRADED)
    degraded = status.condition_of(new, status.DEGRADED)
    if degraded.get("status") == "True" and status.differs(old, degraded):
        found.append(Event("Warning", str(degraded["reason"]), str(degraded.get("message", ""))))
    elif degraded.get("status") == "False" and old.get("status") == "True":
        found.append(Event("Normal", "Recovered", f"no longer degraded ({old.get('reason')})"))
    was_stored = status.condition_of(previous, status.STORAGE_READY)
    stored = status.condition_of(new, status.STORAGE_READY)
    if stored.get("reason") in STORAGE_WARNINGS and stored.get("reason") != was_stored.get(
        "reason"
    ):
        found.append(Event("Warning", str(stored["reason"]), str(stored.get("message", ""))))
    elif stored.get("status") == "True" and was_stored.get("reason") in STORAGE_WARNINGS:
        found.append(Event("Normal", "StorageRecovered", f"{was_stored.get('reason')} is over"))
    was_served = status.condition_of(previous, serving_tls.CONDITION)
    served = status.condition_of(new, serving_tls.CONDITION)
    reason = served.get("reason")
    if reason in CERTIFICATE_WARNINGS and reason != was_served.get("reason"):
        found.append(
            Event("Warning", CERTIFICATE_WARNINGS[str(reason)], str(served.get("message", "")))
        )
    return found


# StorageReady reasons worth a Warning (once per transition): what a person must fix.
# (NoReadyReplica is not one: every new Registry on S3 passes through it while starting.)
STORAGE_WARNINGS = frozenset({status.STORAGE_FULL, "SecretMissing", "BackendUnavailable"})
# CertificateReady reasons worth a Warning, and the Event's reason.
CERTIFICATE_WARNINGS = {
    "ExpiresSoon": "CertificateExpiring",
    "SecretMissing": "CertificateSecretMissing",
    "SecretInvalid": "CertificateInvalid",
}
