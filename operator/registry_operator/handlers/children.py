"""Handlers for the children: any change or deletion re-reconciles what wrote the child."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from registry_operator.handlers import runtime
from registry_operator.rendering import names

# The watched kinds: (group, version, plural).
WATCHED = (
    ("", "v1", "configmaps"),
    ("", "v1", "secrets"),
    ("", "v1", "services"),
    ("", "v1", "persistentvolumeclaims"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "daemonsets"),
    ("networking.k8s.io", "v1", "ingresses"),
    ("policy", "v1", "poddisruptionbudgets"),
)
SELECTOR = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"


async def child_changed(
    *,
    type: str | None,
    body: kopf.Body,
    resource: kopf.Resource,
    labels: Mapping[str, str],
    namespace: str | None,
    name: str,
    memo: Any,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    if type is None or namespace is None:
        return  # the initial listing at startup: resume handlers cover every Registry
    registry = labels.get(names.REGISTRY_LABEL)
    if not registry:
        return
    state = runtime.of(memo)
    kind = resource.kind or ""
    if type == "DELETED":
        state.forget(kind, namespace, name)
    elif state.own_write(kind, namespace, name, str(body.metadata.get("resourceVersion"))):
        return
    # Objects outside the registry's namespace (Secrets in granted namespaces, the
    # kube-public/local-registry-hosting ConfigMap) name its namespace in a label; the
    # policy and robots Secrets live next to the Registry and come from the access
    # reconcile, like the Secrets in granted namespaces.
    registry_namespace = labels.get(names.REGISTRY_NAMESPACE_LABEL, namespace)
    if labels.get(names.COMPONENT_LABEL) in names.ACCESS_COMPONENTS:
        # Pull Secrets in many namespaces: one queued run serves all their events.
        state.request_access(registry_namespace, registry)
        return
    # Not awaited: a burst of events (a thousand Deployments rolling out) shares one
    # queued run per Registry, and this watch worker does not wait, holding the body.
    state.request_reconcile(registry_namespace, registry)
