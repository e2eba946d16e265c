"""Kopf glue only: which events call which handler. Handlers parse, reconcile, report."""

from __future__ import annotations

import kopf

from registry_operator import GROUP, VERSION, models
from registry_operator.handlers import lifecycle, registries, repositories


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
    # Resync, readiness and replication status: one poller, not Kopf timers per Registry.
    kopf.on.startup(id="start-polling", registry=registry)(
        lifecycle.polling_starter(
            resync_seconds=resync_seconds, poll_seconds=replication_poll_seconds
        )
    )
    kopf.on.cleanup(id="stop-polling", registry=registry)(lifecycle.stop_polling)
    # The children: watched by the operator, metadata only (`child_watch`), not by Kopf.
    kopf.on.startup(id="watch-children", registry=registry)(lifecycle.start_child_watch)
    kopf.on.cleanup(id="stop-watching-children", registry=registry)(lifecycle.stop_child_watch)
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
    kopf.on.event(GROUP, VERSION, models.REPOSITORY_PLURAL, id="repository", registry=registry)(
        repositories.repository_changed
    )
    kopf.on.event("", "v1", "namespaces", id="namespace", registry=registry)(
        repositories.namespace_changed
    )
