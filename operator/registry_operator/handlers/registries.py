"""Handlers for Registry objects: create, update, resume, and a slow resync timer."""

from __future__ import annotations

from typing import Any

import kopf

from registry_operator.handlers import runtime
from registry_operator.kube import errors


async def reconcile_registry(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    assert namespace is not None  # Registry is a namespaced kind
    try:
        outcome = await runtime.of(memo).reconcile(namespace, name)
    except errors.Conflict as exc:
        raise kopf.TemporaryError(f"conflict, retrying: {exc}", delay=1) from exc
    except errors.KubeError as exc:
        raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=10) from exc
    if outcome.failure is not None:
        # Status and a Warning event say why; a new spec (an update) triggers a new try.
        raise kopf.PermanentError(f"{outcome.failure.reason}: {outcome.failure.message}")
    logger.debug("reconciled %s/%s", namespace, name)


async def resync_registry(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    """The safety net under the watch events: catches anything a missed event left behind."""
    assert namespace is not None
    try:
        await runtime.of(memo).reconcile(namespace, name)
    except errors.KubeError as exc:
        logger.warning("resync of %s/%s failed, next interval retries: %s", namespace, name, exc)
