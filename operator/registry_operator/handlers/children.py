"""The children's watch: any change or deletion of a child re-reconciles what wrote it.

The children are watched by the operator itself, metadata only (`child_watch`), not by
Kopf: Kopf lists and keeps whole objects, and holds every object's first event until
its indexes are filled. After a restart at 1,000 Registries that was 13,000 children
(Deployments with their pod templates, Secrets with their certificates) in memory at
once, most of the operator's peak (issue 18); a change only needs to say which object
changed, in which version, with which labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from registry_operator.handlers import runtime
from registry_operator.rendering import names

# The watched kinds: (apiVersion, kind).
WATCHED = (
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "DaemonSet"),
    ("networking.k8s.io/v1", "Ingress"),
    ("policy/v1", "PodDisruptionBudget"),
)
SELECTOR = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"


def changed(state: runtime.Runtime, kind: str, type: str, meta: Mapping[str, Any]) -> None:
    """One watch event of a child (`meta`: its metadata): ask for the reconcile of the
    Registry that wrote it, unless it only echoes our own write."""
    namespace, name = meta.get("namespace"), meta.get("name")
    labels: Mapping[str, str] = meta.get("labels") or {}
    registry = labels.get(names.REGISTRY_LABEL)
    if not namespace or not name or not registry:
        return
    if type == "DELETED":
        state.forget(kind, namespace, name)
    elif state.own_write(kind, namespace, name, str(meta.get("resourceVersion"))):
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
    # A burst of events (a thousand Deployments rolling out) shares one queued run per
    # Registry; nothing waits for it here.
    state.request_reconcile(registry_namespace, registry)
