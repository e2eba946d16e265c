"""Kopf glue only: which events call which handler. Handlers parse, reconcile, report."""

from __future__ import annotations

import kopf

from registry_operator import GROUP, VERSION, models
from registry_operator.handlers import children, lifecycle, registries, repositories
from registry_operator.rendering import names


def register(
    registry: kopf.OperatorRegistry,
    *,
    resync_seconds: float,
    replication_poll_seconds: float = 15.0,
) -> None:
    """Attach every handler to `registry` (nothing is registered at import time)."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(id="ensure-peering", registry=registry)(lifecycle.ensure_peering)
    kopf.on.startup(id="remember-index", registry=registry)(registries.remember_index)
    kopf.index(GROUP, VERSION, models.PLURAL, id=registries.CLAIMS_INDEX, registry=registry)(
        registries.index_claim
    )
    kopf.index(GROUP, VERSION, models.PLURAL, id=registries.PEERS_INDEX, registry=registry)(
        registries.index_peers
    )
    kopf.index(
        GROUP,
        VERSION,
        models.REPOSITORY_PLURAL,
        id=repositories.REPOSITORIES_INDEX,
        registry=registry,
    )(repositories.index_repository)
    kopf.index("", "v1", "namespaces", id=repositories.NAMESPACES_INDEX, registry=registry)(
        repositories.index_namespace
    )
    kopf.on.event(GROUP, VERSION, models.PLURAL, id="node-claims", registry=registry)(
        registries.registry_changed
    )
    for on, handler_id in (
        (kopf.on.create, "reconcile-create"),
        (kopf.on.update, "reconcile-update"),
    ):
        on(GROUP, VERSION, models.PLURAL, id=handler_id, registry=registry)(
            registries.reconcile_registry
        )
    kopf.on.resume(GROUP, VERSION, models.PLURAL, id="reconcile-resume", registry=registry)(
        registries.resume_registry
    )
    kopf.on.delete(GROUP, VERSION, models.PLURAL, id="revoke-access", registry=registry)(
        registries.delete_registry
    )
    kopf.timer(
        GROUP,
        VERSION,
        models.PLURAL,
        id="resync",
        interval=resync_seconds,
        initial_delay=resync_seconds,
        registry=registry,
    )(registries.resync_registry)
    kopf.timer(
        GROUP,
        VERSION,
        models.PLURAL,
        id="replication-status",
        interval=replication_poll_seconds,
        when=registries.has_peers,
        registry=registry,
    )(registries.poll_replication)
    kopf.timer(
        GROUP,
        VERSION,
        models.PLURAL,
        id="readiness",
        interval=replication_poll_seconds,
        initial_delay=min(replication_poll_seconds, 5.0),
        registry=registry,
    )(registries.poll_readiness)
    kopf.on.event(GROUP, VERSION, models.REPOSITORY_PLURAL, id="repository", registry=registry)(
        repositories.repository_changed
    )
    kopf.on.event("", "v1", "namespaces", id="namespace", registry=registry)(
        repositories.namespace_changed
    )
    for group, version, plural in children.WATCHED:
        kopf.on.event(
            group,
            version,
            plural,
            id=f"child-{plural}",
            labels={names.MANAGED_BY_LABEL: names.MANAGED_BY},
            registry=registry,
        )(children.child_changed)
