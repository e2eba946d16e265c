"""Which Registries of the cluster replicate with each other, and how each peer is wired.

Pure: no I/O here. A Registry named in another's `registryRef` peer is wired to it only
when both list each other, so that nobody gets write access to a registry by naming it;
then the account it replicates in with must exist (the peer's access reconcile makes
it, `robots.peer_key`). A peer given by URL needs a Secret with `username` and
`password`. `reconcile` reads what these functions decide on, and `granting` asks which
peers get an account.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from registry_operator import models, robots, status
from registry_operator.rendering import manifests, names

Body = Mapping[str, Any]  # a Registry as the API server returns it


def ref_of(registry: models.Registry) -> models.RegistryRef:
    return models.RegistryRef(registry.owner.name, registry.owner.namespace)


def listed(registry: models.Registry) -> list[models.RegistryRef]:
    """The same-cluster Registries it names as peers, in the spec's order."""
    return [peer.registry for peer in registry.spec.peers if peer.registry is not None]


def mutual(one: models.Registry, other: models.Registry) -> bool:
    """The rule for same-cluster peers: both list each other."""
    return ref_of(other) in listed(one) and ref_of(one) in listed(other)


def _raw_ref(body: Body) -> models.RegistryRef:
    meta = body.get("metadata") or {}
    return models.RegistryRef(str(meta.get("name")), str(meta.get("namespace")))


def _raw_lists(body: Body, ref: models.RegistryRef) -> bool:
    """Whether a Registry lists `ref`, read from its raw spec: one that does not parse
    still names its peers."""
    namespace = _raw_ref(body).namespace
    peers = ((body.get("spec") or {}).get("replication") or {}).get("peers") or []
    return any(
        isinstance(p, Mapping)
        and (p.get("registryRef") or {}).get("name") == ref.name
        and ((p.get("registryRef") or {}).get("namespace") or namespace) == ref.namespace
        for p in peers
    )


def peers_stub(body: Body) -> dict[str, Any]:
    """What `to_tell` reads of a Registry: its name and its raw peers. The operator keeps
    this of every Registry in an index, so that a spec change does not list them all."""
    meta = body.get("metadata") or {}
    stub: dict[str, Any] = {
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")}
    }
    peers = ((body.get("spec") or {}).get("replication") or {}).get("peers")
    if peers:
        stub["spec"] = {"replication": {"peers": copy.deepcopy(peers)}}
    return stub


def to_tell(registry: models.Registry, everyone: Iterable[Body]) -> list[models.RegistryRef]:
    """After a spec change: the Registries this one lists, and those listing it, which
    decide again whether they are wired to it (both consent, or neither is wired)."""
    me = ref_of(registry)
    mine = listed(registry)
    found = []
    for body in everyone:
        ref = _raw_ref(body)
        if ref != me and (ref in mine or _raw_lists(body, me)):
            found.append(ref)
    return found


def consenting(
    registry: models.Registry, found: Iterable[tuple[models.RegistryRef, Body | None]]
) -> tuple[str, ...]:
    """The peer accounts the registry keeps (`robots.peer_key`): one for each Registry it
    lists (`found`: each as read, None when missing) that lists it and is not being
    deleted."""
    keys = []
    for ref, body in found:
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        try:
            other = models.parse_registry(body)
        except models.InvalidSpec:
            continue
        if mutual(registry, other):
            keys.append(robots.peer_key(ref.namespace, ref.name))
    return tuple(sorted(keys))


# --- wiring the peers into the server's configuration --------------------------------------


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One peer, decided."""

    state: status.PeerState
    wired: manifests.WiredPeer | None = None  # None: left out of the server config
    password: str | None = None  # a same-cluster peer's: for the replication Secret
    waiting_on: models.RegistryRef | None = None  # whose access reconcile makes the account


@dataclasses.dataclass(frozen=True)
class Wiring:
    """Every peer of a Registry, decided."""

    replication: manifests.Replication
    states: tuple[status.PeerState, ...]
    waiting_on: tuple[models.RegistryRef, ...]  # their access reconciles run next


def refusal(registry: models.Registry, peer: models.Peer, body: Body | None) -> Resolved | None:
    """Why a same-cluster peer cannot be wired whatever its account: it is missing, its
    spec is invalid, or it does not list this Registry. None: it consents."""
    ref = peer.registry
    assert ref is not None
    # The scheme of a peer that is missing or invalid is not known: https, the default.
    url = names.in_cluster_url(ref.name, ref.namespace, "https")
    if body is None:
        message = f"Registry {ref.namespace}/{ref.name} does not exist"
        return Resolved(status.PeerState(peer.name, url, "PeerNotFound", message))
    try:
        other = models.parse_registry(body)
    except models.InvalidSpec as exc:
        return Resolved(status.PeerState(peer.name, url, "PeerInvalid", str(exc)))
    url = names.in_cluster_url(ref.name, ref.namespace, other.spec.scheme)
    if not mutual(registry, other):
        message = (
            f"Registry {ref.namespace}/{ref.name} does not list this Registry as a peer; both must"
        )
        return Resolved(status.PeerState(peer.name, url, "NotMutual", message))
    return None


def in_cluster(
    registry: models.Registry,
    peer: models.Peer,
    peer_robots: Mapping[str, str],
    scheme: str,
    ca_pem: str | None,
) -> Resolved:
    """A consenting same-cluster peer, with the decoded data of its robots Secret: wired
    once the peer has made the account this Registry replicates in with and, when it
    serves TLS (`scheme`), its certificate's CA (`ca_pem`) is known, which this
    Registry's server then verifies it with."""
    owner, ref = registry.owner, peer.registry
    assert ref is not None
    url = names.in_cluster_url(ref.name, ref.namespace, scheme)
    if scheme == "https" and not ca_pem:
        message = f"waiting for Registry {ref.namespace}/{ref.name} to have its certificate's CA"
        return Resolved(status.PeerState(peer.name, url, "WaitingForCertificate", message))
    key = robots.peer_key(owner.namespace, owner.name)
    account = robots.load(key, peer_robots[key]) if key in peer_robots else None
    if account is None:
        message = (
            f"waiting for Registry {ref.namespace}/{ref.name} to create the account this "
            "one replicates with"
        )
        return Resolved(
            status.PeerState(peer.name, url, "WaitingForCredentials", message), waiting_on=ref
        )
    wired = manifests.WiredPeer(
        name=peer.name,
        url=url,
        kind="berth",
        username=account.current.name,
        secret=names.replication_secret(owner.name),
        key=peer.name,
        ca_pem=ca_pem if scheme == "https" else None,
    )
    return Resolved(status.PeerState(peer.name, url), wired, account.current.password)


def by_url(peer: models.Peer, secret: Mapping[str, str]) -> Resolved:
    """A peer in another cluster, with the decoded data of its credentials Secret ({}
    when missing)."""
    assert peer.url is not None and peer.credentials_secret is not None
    # Blank counts as missing: the server strips the files it reads them from.
    if not secret.get("username", "").strip() or not secret.get("password", "").strip():
        message = f"Secret {peer.credentials_secret} needs the keys username and password"
        return Resolved(status.PeerState(peer.name, peer.url, "CredentialsMissing", message))
    if ":" in secret["username"]:
        message = f"Secret {peer.credentials_secret}: the username may not contain ':'"
        return Resolved(status.PeerState(peer.name, peer.url, "CredentialsInvalid", message))
    # Both keys are mounted and read by the server at each use: checked here for the
    # status, never copied into the config.
    wired = manifests.WiredPeer(
        name=peer.name,
        url=peer.url,
        kind=peer.kind,
        username="",
        secret=peer.credentials_secret,
        key="password",
        username_key="username",
    )
    return Resolved(status.PeerState(peer.name, peer.url), wired)


def wiring(resolved: Sequence[Resolved]) -> Wiring:
    passwords = {
        r.state.name: r.password for r in resolved if r.wired is not None and r.password is not None
    }
    return Wiring(
        replication=manifests.Replication(
            tuple(r.wired for r in resolved if r.wired is not None), passwords
        ),
        states=tuple(r.state for r in resolved),
        waiting_on=tuple(r.waiting_on for r in resolved if r.waiting_on is not None),
    )
