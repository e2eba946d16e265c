"""Handlers for Registry objects: create, update, resume, delete; the index of every
Registry's node port claim with the event handler that watches it, and the index of
every Registry's name and peers (which the poller reads too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from registry_operator import node_access, peering
from registry_operator.handlers import polling, repositories, runtime
from registry_operator.kube import errors

# Kopf's index of node port claims, by "namespace/name"; handlers get it by this name.
CLAIMS_INDEX = "berth_node_claims"
# Kopf's index of every Registry's name and peers, by "namespace/name".
PEERS_INDEX = "berth_peer_lists"


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


async def resume_registry(*, reason: Any = None, logger: kopf.Logger, **kwargs: Any) -> None:
    """Once per Registry after the operator starts. A Registry created or changed while
    the operator was down gets its create or update handler in the same cycle, with this
    one mixed in under that handler's reason: that one reconciles, and a second pass
    would only repeat it (a thousand Registries changed during a restart paid for two)."""
    if reason is not None and reason != kopf.Reason.RESUME:
        logger.debug("resumed: reconciled by the %s handler", reason)
        return
    await reconcile_registry(logger=logger, **kwargs)


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
    try:
        # Its claim is marked deleting: the ConfigMap moves on or goes.
        await state.sync_hosting()
    except errors.KubeError as exc:
        raise kopf.TemporaryError(f"cleanup failed, retrying: {exc}", delay=10) from exc
    state.forget_registry(namespace, name)
    # Once the Registry is gone (the finalizer is lifted after this handler), its
    # Repositories are told so.
    state.access_later((namespace, name), 2.0)


def index_claim(body: kopf.Body, **_: Any) -> dict[str, node_access.Claim] | None:
    """Kopf keeps this index of every Registry; Kopf fills it before any handler runs,
    so even the first reconciles after a restart see every other Registry's port."""
    claim = node_access.claim_of(body)
    return None if claim is None else {claim.ref: claim}


def index_peers(body: kopf.Body, **_: Any) -> dict[str, Mapping[str, Any]]:
    """Every Registry's name and the peers it lists: whom a spec change concerns
    (`peering.to_tell`). Read from this index, a reconcile no longer lists every
    Registry of the cluster after each spec change (a thousand Registries changed while
    the operator was down made a thousand lists of megabytes). The poller reads it for
    the Registries to poll, with two more fields (`polling.polled_fields`)."""
    stub = peering.peers_stub(body)
    stub["poll"] = polling.polled_fields(body)
    return {f"{stub['metadata']['namespace']}/{stub['metadata']['name']}": stub}


async def remember_index(*, memo: Any, **kwargs: Any) -> None:
    """At start-up: keep the (live) indexes where the reconciles look for them."""
    state = runtime.of(memo)
    claims = kwargs.get(CLAIMS_INDEX)
    if isinstance(claims, Mapping):
        state.claims_index = claims
    peers = kwargs.get(PEERS_INDEX)
    if isinstance(peers, Mapping):
        state.peers_index = peers
    seen = kwargs.get(repositories.REPOSITORIES_INDEX)
    if isinstance(seen, Mapping):
        state.repositories_index = seen
    namespaces = kwargs.get(repositories.NAMESPACES_INDEX)
    if isinstance(namespaces, Mapping):
        state.namespaces_index = namespaces


async def registry_changed(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    **_: Any,
) -> None:
    """A Registry's node port claim changed (or it appeared, or went): the Registries
    sharing the old or the new port decide again who holds it, and the cluster's
    local-registry-hosting ConfigMap follows."""
    state = runtime.of(memo)
    state.keep_posting_context()  # every Registry's first event, before any poll
    key = f"{namespace}/{name}"
    claim = None if type == "DELETED" else node_access.claim_of(body)
    before = state.claims_seen.get(key)
    if claim is None:
        state.claims_seen.pop(key, None)
    else:
        state.claims_seen[key] = claim
    if type is None or before == claim:
        return  # the initial listing (resuming covers it), or nothing that matters changed
    ports = {c.port for c in (before, claim) if c is not None and c.port is not None}
    for other in state.claims() or []:
        if other.ref != key and other.port in ports:
            state.spawn(f"reconcile of {other.ref}", state.reconcile(other.namespace, other.name))
            state.request_access(other.namespace, other.name)
    state.spawn("local-registry-hosting", state.sync_hosting())
