"""Names and labels of a registry's child objects (pure)."""

from __future__ import annotations

REGISTRY_LABEL = "berth.dev/registry"
# On objects outside the registry's namespace (pull and push Secrets): where it lives.
REGISTRY_NAMESPACE_LABEL = "berth.dev/registry-namespace"
COMPONENT_LABEL = "app.kubernetes.io/component"
PULL_SECRET_COMPONENT = "pull-secret"
PUSH_SECRET_COMPONENT = "push-secret"
# Components written by the access reconcile (the others by the Registry's own).
ACCESS_COMPONENTS = ("policy", "robots", PULL_SECRET_COMPONENT, PUSH_SECRET_COMPONENT)
# On a distributed Secret: the ServiceAccounts it was added to.
SERVICE_ACCOUNTS_ANNOTATION = "berth.dev/service-accounts"
ROBOT_ANNOTATION = "berth.dev/robot"
REPOSITORIES_ANNOTATION = "berth.dev/repositories"
# On a ServiceAccount: the imagePullSecrets entries Berth added (and so may remove).
ADDED_PULL_SECRETS_ANNOTATION = "berth.dev/added-image-pull-secrets"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "berth-operator"
CHECKSUM_ANNOTATION = "berth.dev/config-checksum"

CONTAINER_PORT = 5000
CONFIG_DIR = "/etc/berth/config"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
AUTH_DIR = "/etc/berth/auth"
POLICY_DIR = "/etc/berth/policy"
POLICY_FILE = "policy.yaml"
REPLICATION_DIR = "/etc/berth/replication"
NOTIFICATIONS_DIR = "/etc/berth/notifications"  # one directory of header files per webhook
DATA_DIR = "/var/lib/berth"
RUN_AS = 65532  # the conventional "nonroot" uid/gid of distroless-style images


def config_map(registry: str) -> str:
    return f"{registry}-config"


def secret(registry: str) -> str:
    return f"{registry}-auth"


def policy_secret(registry: str) -> str:
    return f"{registry}-policy"


def robots_secret(registry: str) -> str:
    return f"{registry}-robots"


def replication_secret(registry: str) -> str:
    return f"{registry}-replication"


def webhook_volume(webhook: str) -> str:
    return f"hook-{webhook}"  # webhook names are DNS labels of at most 40 characters


def access_secret(registry: str, registry_namespace: str, mode: str) -> str:
    """Default name of a pull (or push) Secret written into granted namespaces; the
    registry's namespace is part of it, so that two registries never share a name."""
    return f"{registry}-{registry_namespace}-{mode}"


def service_host(registry: str, namespace: str) -> str:
    return f"{service(registry)}.{namespace}.svc:{CONTAINER_PORT}"


def pvc(registry: str) -> str:
    return f"{registry}-data"


def deployment(registry: str) -> str:
    return registry


def service(registry: str) -> str:
    return registry


def ingress(registry: str) -> str:
    return registry


def disruption_budget(registry: str) -> str:
    return registry


def in_cluster_url(registry: str, namespace: str) -> str:
    return f"http://{service_host(registry, namespace)}"


def selector_labels(registry: str) -> dict[str, str]:
    """The Deployment's selector: immutable, so it never includes anything that may change."""
    return {"app.kubernetes.io/name": "berth-registry", "app.kubernetes.io/instance": registry}


def access_labels(registry: str, registry_namespace: str, component: str) -> dict[str, str]:
    """Labels of the Secrets written into granted namespaces: enough to find them all."""
    return {
        **labels(registry, component),
        REGISTRY_NAMESPACE_LABEL: registry_namespace,
    }


def access_selector(registry: str, registry_namespace: str) -> str:
    return (
        f"{MANAGED_BY_LABEL}={MANAGED_BY},{REGISTRY_LABEL}={registry},"
        f"{REGISTRY_NAMESPACE_LABEL}={registry_namespace}"
    )


def labels(registry: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(registry),
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "berth",
        MANAGED_BY_LABEL: MANAGED_BY,
        REGISTRY_LABEL: registry,
    }
