"""Handlers for Repositories and namespaces: both only trigger a registry's access
reconcile, and two indexes keep what those reconciles read about them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from registry_operator import access, granting, models
from registry_operator.handlers import runtime

# Kopf's indexes, by these names: every Repository by its Registry (what access needs of
# it, not the object) and every namespace (name, labels, terminating). Kopf fills them
# before any handler runs; the access reconciles read them instead of listing.
REPOSITORIES_INDEX = "berth_repositories"
NAMESPACES_INDEX = "berth_namespaces"
ALL = "all"  # the namespaces index's one key


def index_repository(body: kopf.Body, **_: Any) -> dict[tuple[str, str], granting.Seen] | None:
    found = granting.see(body)
    return None if found is None else {found[0]: found[1]}


def index_namespace(body: kopf.Body, **_: Any) -> dict[str, access.Namespace]:
    return {ALL: granting.namespace_of(body)}


async def repository_changed(
    *,
    type: str | None,
    body: kopf.Body,
    spec: Mapping[str, Any],
    namespace: str | None,
    name: str,
    memo: Any,
    **_: Any,
) -> None:
    """Any change of a Repository (its deletion included) re-plans its registry's access.

    No finalizer is needed: access is level-based, so a Repository that vanished while
    the operator was down is revoked when the operator resumes its Registries.
    """
    if namespace is None:
        return
    registry = (spec.get("registryRef") or {}).get("name")
    if not registry:
        return
    state = runtime.of(memo)
    version = str(body.metadata.get("resourceVersion"))
    if type == "DELETED":
        state.forget(models.REPOSITORY_KIND, namespace, name)
    elif state.own_write(models.REPOSITORY_KIND, namespace, name, version):
        return  # our status write
    state.request_access(namespace, str(registry))


async def namespace_changed(
    *, type: str | None, body: kopf.Body, name: str, memo: Any, **_: Any
) -> None:
    """A namespace created, relabelled or deleted: registries that may grant it re-plan.

    Event-driven (a watch, not polling), so a new matching namespace gets its Secrets
    within the time of one access reconcile.
    """
    state = runtime.of(memo)
    labels = dict(body.metadata.labels or {})
    terminating = bool(body.metadata.get("deletionTimestamp"))
    before = state.namespaces.get(name)
    if type == "DELETED":
        state.namespaces.pop(name, None)
    else:
        state.namespaces[name] = (labels, terminating)
    if type is None:
        return  # the initial listing: resuming the Registries covers every namespace
    if type == "MODIFIED" and before == (labels, terminating):
        return  # nothing access depends on changed (say, a status or annotation)
    old_labels = before[0] if before is not None else None
    for (registry_namespace, registry), interest in list(state.interest.items()):
        if interest.concerns(name, labels) or interest.concerns(name, old_labels):
            state.request_access(registry_namespace, registry)
