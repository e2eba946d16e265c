"""The API paths of the kinds the operator touches (pure)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    def path(
        self,
        namespace: str | None,
        name: str | None = None,
        subresource: str | None = None,
        *,
        all_namespaces: bool = False,
    ) -> str:
        """The URL path; `all_namespaces` lists a namespaced kind across the cluster."""
        scope = f"/namespaces/{namespace}" if self.namespaced and not all_namespaces else ""
        if all_namespaces and (name is not None or not self.namespaced):
            raise ValueError("all_namespaces only lists a namespaced kind")
        if self.namespaced and not namespace and not all_namespaces:
            raise ValueError(f"{self.kind} is namespaced: a namespace is required")
        for segment in (namespace, name):
            # A name from a custom resource must stay one path segment: ``../..`` or a
            # slash would reach another object (URL clients remove dot segments).
            if segment is not None and (
                segment in ("", ".", "..") or any(c in segment for c in "/?#%\\")
            ):
                raise ValueError(f"{segment[:80]!r} cannot name a {self.kind} or a namespace")
        path = f"{self.prefix}{scope}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


KNOWN = (
    Resource("v1", "ConfigMap", "configmaps"),
    Resource("v1", "Secret", "secrets"),
    Resource("v1", "ServiceAccount", "serviceaccounts"),
    Resource("v1", "Namespace", "namespaces", namespaced=False),
    Resource("v1", "Service", "services"),
    Resource("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Resource("apps/v1", "Deployment", "deployments"),
    Resource("apps/v1", "DaemonSet", "daemonsets"),
    Resource("networking.k8s.io/v1", "Ingress", "ingresses"),
    Resource("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Resource("berth.dev/v1alpha1", "Registry", "registries"),
    Resource("berth.dev/v1alpha1", "Repository", "repositories"),
    Resource("kopf.dev/v1", "ClusterKopfPeering", "clusterkopfpeerings", namespaced=False),
)
_BY_KIND = {(r.api_version, r.kind): r for r in KNOWN}


def lookup(api_version: str, kind: str) -> Resource:
    try:
        return _BY_KIND[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None


def of(manifest: dict[str, object]) -> Resource:
    return lookup(str(manifest["apiVersion"]), str(manifest["kind"]))
