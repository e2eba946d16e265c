"""Handlers for Registry objects: create, update, resume, delete, and two timers."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from registry_operator.handlers import runtime
from registry_operator.kube import errors


async def reconcile_registry(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    assert namespace is not None  # Registry is a namespaced kind
    state = runtime.of(memo)
    try:
        outcome = await state.reconcile(namespace, name)
        # The policy Secret the pods mount, the peers' accounts, the pull Secrets (their
        # registry host is in them): all follow the Registry too.
        await state.reconcile_access(namespace, name)
    except errors.Conflict as exc:
        raise kopf.TemporaryError(f"conflict, retrying: {exc}", delay=1) from exc
    except errors.KubeError as exc:
        raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=10) from exc
    if outcome.failure is not None:
        # Status and a Warning event say why; a new spec (an update) triggers a new try.
        raise kopf.PermanentError(f"{outcome.failure.reason}: {outcome.failure.message}")
    logger.debug("reconciled %s/%s", namespace, name)


async def delete_registry(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    """Owned children go with the garbage collector; the Secrets in other namespaces (and
    the ServiceAccount entries) are removed here, before the finalizer is lifted."""
    assert namespace is not None
    state = runtime.of(memo)
    try:
        await state.reconcile_access(namespace, name)
    except errors.KubeError as exc:
        raise kopf.TemporaryError(f"cleanup failed, retrying: {exc}", delay=10) from exc
    state.forget_registry(namespace, name)
    # Once the Registry is gone (the finalizer is lifted after this handler), its
    # Repositories are told so.
    state.access_later((namespace, name), 2.0)


async def resync_registry(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    """The safety net under the watch events: catches anything a missed event left behind."""
    assert namespace is not None
    state = runtime.of(memo)
    try:
        await state.reconcile(namespace, name)
        await state.reconcile_access(namespace, name)
    except errors.KubeError as exc:
        logger.warning("resync of %s/%s failed, next interval retries: %s", namespace, name, exc)


def has_peers(spec: Any, **_: Any) -> bool:
    return bool(((spec or {}).get("replication") or {}).get("peers"))


async def poll_replication(
    *, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    """Copy the server's per-peer replication status into the Registry's status."""
    assert namespace is not None
    state = runtime.of(memo)
    try:
        observed = await asyncio.to_thread(state.fetch_replication, namespace, name)
    except errors.KubeError as exc:
        logger.warning("reading the admin credentials of %s/%s failed: %s", namespace, name, exc)
        return
    if state.replication.get((namespace, name)) == observed:
        return
    state.replication[(namespace, name)] = observed
    try:
        await state.reconcile(namespace, name)
    except errors.KubeError as exc:
        logger.warning("status of %s/%s not written, next poll retries: %s", namespace, name, exc)
