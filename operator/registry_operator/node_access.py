"""How kubelets reach a Registry: node ports and the cluster's local-registry-hosting.

Pure: no I/O here. A container runtime resolves image names with the node's DNS (no
`*.svc`) and speaks plain HTTP only to `localhost`, so each Registry runs a proxy on
every node at `localhost:<port>` (docs/operator.md, "Node access"). A node port can be
held by one Registry only, and KEP-1755's `kube-public/local-registry-hosting` can name
one Registry only; both are decided here over every Registry of the cluster, which is
what a `Claim` summarises. `reconcile` and `granting` take the claims from the
operator's index of Registries (or list them when run on their own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from registry_operator import models
from registry_operator.rendering import names


@dataclasses.dataclass(frozen=True)
class Claim:
    """What one Registry asks of the nodes."""

    namespace: str
    name: str
    created: str  # creationTimestamp (RFC 3339, so strings order like times)
    port: int | None  # the node port of its proxy; None: no proxy (disabled or invalid spec)
    hosting: bool | None = None  # its local-registry-hosting annotation
    deleting: bool = False
    ingress_host: str | None = None
    uid: str = ""

    @property
    def age_key(self) -> tuple[str, str, str]:
        """Orders Registries by age: the older keeps a contested port."""
        return (self.created, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def port_of(spec: models.Spec, owner: models.Owner) -> int | None:
    """The port a Registry's proxy listens on, on every node; None when it has none."""
    if not spec.node_proxy.enabled:
        return None
    if spec.node_proxy.port is not None:
        return spec.node_proxy.port
    return names.default_node_port(owner.name, owner.namespace)


def claim(registry: models.Registry) -> Claim:
    owner = registry.owner
    return Claim(
        namespace=owner.namespace,
        name=owner.name,
        created=registry.created,
        port=port_of(registry.spec, owner),
        hosting=registry.hosting,
        deleting=registry.deleting,
        ingress_host=registry.spec.ingress.host if registry.spec.ingress else None,
        uid=owner.uid,
    )


def claim_of(body: Mapping[str, Any]) -> Claim | None:
    """A claim from a raw Registry; a spec that cannot be parsed claims no port."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        return None
    try:
        # The image does not matter here: skip the lookup of the default one.
        return claim(models.parse_registry(body, image="-"))
    except models.InvalidSpec:
        return Claim(
            namespace=namespace,
            name=name,
            created=str(meta.get("creationTimestamp", "")),
            port=None,
            deleting=meta.get("deletionTimestamp") is not None,
            uid=str(meta.get("uid", "")),
        )


def holder(port: int, claims: Iterable[Claim]) -> Claim | None:
    """The Registry that keeps `port`: the oldest claiming it. A Registry being deleted
    keeps it until it is gone (its proxy pods still hold the port on the nodes)."""
    return min((c for c in claims if c.port == port), key=lambda c: c.age_key, default=None)


def conflict(me: Claim, claims: Iterable[Claim]) -> Claim | None:
    """The other Registry holding my port, if any: then I get no proxy."""
    if me.port is None:
        return None
    found = holder(me.port, [*claims, me])
    return (
        None if found is None or (found.namespace, found.name) == (me.namespace, me.name) else found
    )


def served_port(me: Claim, claims: Iterable[Claim]) -> int | None:
    """The port my proxy may really use: mine, unless an older Registry holds it."""
    return None if me.port is None or conflict(me, claims) is not None else me.port


def conflict_message(me: Claim, other: Claim) -> str:
    return (
        f"node port {me.port} is held by Registry {other.ref}, which is older; this "
        "Registry gets no node proxy until one of them changes spec.nodeProxy.port"
    )


def hosting(claims: Iterable[Claim]) -> Claim | None:
    """The Registry named in kube-public/local-registry-hosting, if any.

    Among the Registries with a working node proxy that are not being deleted and not
    annotated "false": the oldest of those annotated "true", else the oldest of all.
    Adding a Registry never moves the ConfigMap; deleting the named one does.
    """
    every = list(claims)
    eligible = [
        c
        for c in every
        if c.hosting is not False and not c.deleting and served_port(c, every) is not None
    ]
    chosen = [c for c in eligible if c.hosting] or eligible
    return min(chosen, key=lambda c: c.age_key, default=None)


def pull_hosts(registry: models.Registry, served: int | None) -> tuple[str, ...]:
    """The keys of `auths` in the pull Secrets: every address a pod's image may name."""
    owner = registry.owner
    hosts = []
    if served is not None:
        hosts.append(names.node_host(served))
    if registry.spec.ingress is not None:
        hosts.append(registry.spec.ingress.host)
    hosts.append(names.service_host(owner.name, owner.namespace))
    return tuple(hosts)
