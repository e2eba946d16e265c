"""Names and labels of a registry's child objects (pure)."""

from __future__ import annotations

REGISTRY_LABEL = "berth.dev/registry"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "berth-operator"
CHECKSUM_ANNOTATION = "berth.dev/config-checksum"

CONTAINER_PORT = 5000
CONFIG_DIR = "/etc/berth/config"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
AUTH_DIR = "/etc/berth/auth"
DATA_DIR = "/var/lib/berth"
RUN_AS = 65532  # the conventional "nonroot" uid/gid of distroless-style images


def config_map(registry: str) -> str:
    return f"{registry}-config"


def secret(registry: str) -> str:
    return f"{registry}-auth"


def pvc(registry: str) -> str:
    return f"{registry}-data"


def deployment(registry: str) -> str:
    return registry


def service(registry: str) -> str:
    return registry


def ingress(registry: str) -> str:
    return registry


def in_cluster_url(registry: str, namespace: str) -> str:
    return f"http://{service(registry)}.{namespace}.svc:{CONTAINER_PORT}"


def selector_labels(registry: str) -> dict[str, str]:
    """The Deployment's selector: immutable, so it never includes anything that may change."""
    return {"app.kubernetes.io/name": "berth-registry", "app.kubernetes.io/instance": registry}


def labels(registry: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(registry),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "berth",
        MANAGED_BY_LABEL: MANAGED_BY,
        REGISTRY_LABEL: registry,
    }
