"""Kopf glue only: which events call which handler. Handlers parse, reconcile, report."""

from __future__ import annotations

import kopf

from registry_operator import GROUP, VERSION, models
from registry_operator.handlers import children, lifecycle, registries
from registry_operator.rendering import names


def register(registry: kopf.OperatorRegistry, *, resync_seconds: float) -> None:
    """Attach every handler to `registry` (nothing is registered at import time)."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(id="ensure-peering", registry=registry)(lifecycle.ensure_peering)
    for on, handler_id in (
        (kopf.on.create, "reconcile-create"),
        (kopf.on.update, "reconcile-update"),
        (kopf.on.resume, "reconcile-resume"),
    ):
        on(GROUP, VERSION, models.PLURAL, id=handler_id, registry=registry)(
            registries.reconcile_registry
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
    for group, version, plural in children.WATCHED:
        kopf.on.event(
            group,
            version,
            plural,
            id=f"child-{plural}",
            labels={names.MANAGED_BY_LABEL: names.MANAGED_BY},
            registry=registry,
        )(children.child_changed)
