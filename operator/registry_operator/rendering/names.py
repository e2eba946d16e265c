"""Names and labels of a registry's child objects (pure)."""

from __future__ import annotations

import hashlib

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
# The server's /metrics listener (http.metrics_addr): a port of its own, which the
# Ingress never routes; the Service names it "metrics" for a ServiceMonitor.
METRICS_PORT = 9090
METRICS_PORT_NAME = "metrics"
CONFIG_DIR = "/etc/berth/config"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
AUTH_DIR = "/etc/berth/auth"
POLICY_DIR = "/etc/berth/policy"
POLICY_FILE = "policy.yaml"
POLICY_COMPONENT = "policy"
# On the main policy Secret: how many shard Secrets the policy has now.
POLICY_SHARDS_ANNOTATION = "berth.dev/policy-shards"
# Shard Secrets every pod mounts (optional sources): room for ~3 MiB of compressed policy,
# about 300,000 grants, before a larger policy needs more, which rolls the pods once.
POLICY_SHARD_SLOTS = 8
REPLICATION_DIR = "/etc/berth/replication"
NOTIFICATIONS_DIR = "/etc/berth/notifications"  # one directory of header files per webhook
DATA_DIR = "/var/lib/berth"
BACKUP_DIR = "/var/lib/berth-backup"  # spec.backup's claim, outside DATA_DIR
# The user's Secrets and ConfigMap for the external back ends, each a volume of its own.
S3_CREDENTIALS_DIR = "/etc/berth/s3"
S3_CA_DIR = "/etc/berth/s3-ca"
S3_CA_FILE = "ca.crt"
UPSTREAMS_DIR = "/etc/berth/upstreams"  # <name>/password and <name>.ca/ca.crt per upstream
POSTGRESQL_DIR = "/etc/berth/postgresql"
POSTGRESQL_DSN_FILE = "dsn"
# spec.tls: the serving certificate's Secret (tls.crt, tls.key) in the server's pod, and
# its ca.crt alone in each node proxy.
TLS_DIR = "/etc/berth/tls"
TLS_CA_DIR = "/etc/berth/tls-ca"
RUN_AS = 65532  # the conventional "nonroot" uid/gid of distroless-style images

NODE_PROXY_COMPONENT = "node-proxy"
# The node port a Registry's proxy takes when its spec names none: one of these, by a
# hash of namespace/name. Below the NodePort range (30000-32767) and above the ports
# node software commonly listens on, leaving out the few in between that nodes do run
# (a hostPort on 127.0.0.1 would capture the node's own localhost traffic to them).
NODE_PORTS_AVOIDED = frozenset(
    {
        5353,  # mDNS
        5355,  # LLMNR (systemd-resolved, TCP too)
        5432,  # PostgreSQL
        5433,
        5601,  # Kibana
        5666,  # Nagios NRPE
        5672,  # AMQP
        5683,  # CoAP
        5684,
    }
)
DEFAULT_NODE_PORTS = tuple(p for p in range(5100, 5900) if p not in NODE_PORTS_AVOIDED)
# KEP-1755: the cluster's one advertisement of a local registry.
LOCAL_REGISTRY_HOSTING_NAMESPACE = "kube-public"
LOCAL_REGISTRY_HOSTING = "local-registry-hosting"
LOCAL_REGISTRY_HOSTING_COMPONENT = "local-registry-hosting"
LOCAL_REGISTRY_HOSTING_KEY = "localRegistryHosting.v1"
LOCAL_REGISTRY_HOSTING_HELP = (
    "https://github.com/berth-dev/berth/blob/main/docs/operator.md#node-access"
)


def config_map(registry: str) -> str:
    return f"{registry}-config"


def secret(registry: str) -> str:
    return f"{registry}-auth"


def policy_secret(registry: str) -> str:
    return f"{registry}-policy"


def policy_shard_secret(registry: str, index: int) -> str:
    return f"{registry}-policy-{index}"


def policy_shard_file(index: int) -> str:
    return f"policy-{index}.json.gz"


def robots_secret(registry: str) -> str:
    return f"{registry}-robots"


def serving_secret(registry: str) -> str:
    """spec.tls Generated: the serving certificate, its key and the CA (cert-manager's keys)."""
    return f"{registry}-serving-tls"


def serving_ca_secret(registry: str) -> str:
    """spec.tls Generated: the CA's certificate and key, which only the operator reads."""
    return f"{registry}-serving-ca"


def peer_ca_file(peer: str) -> str:
    """A registryRef peer's CA in the Registry's ConfigMap (and so in its config dir)."""
    return f"peer-{peer}-ca.crt"


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


def backup_pvc(registry: str) -> str:
    return f"{registry}-backup"


def deployment(registry: str) -> str:
    return registry


def service(registry: str) -> str:
    return registry


def ingress(registry: str) -> str:
    return registry


def disruption_budget(registry: str) -> str:
    return registry


def node_proxy(registry: str) -> str:
    return f"{registry}-node-proxy"


def default_node_port(registry: str, namespace: str) -> int:
    """The node port of a Registry whose spec names none: stable for its whole life."""
    digest = hashlib.sha256(f"{namespace}/{registry}".encode()).digest()
    return DEFAULT_NODE_PORTS[int.from_bytes(digest[:8], "big") % len(DEFAULT_NODE_PORTS)]


def node_host(port: int) -> str:
    """What kubelets pull from: containerd speaks plain HTTP to localhost only."""
    return f"localhost:{port}"


def node_proxy_selector_labels(registry: str) -> dict[str, str]:
    """Not the server's: the Service must never send clients to a proxy pod."""
    return {"app.kubernetes.io/name": "berth-node-proxy", "app.kubernetes.io/instance": registry}


def node_proxy_labels(registry: str) -> dict[str, str]:
    return {**labels(registry, NODE_PROXY_COMPONENT), **node_proxy_selector_labels(registry)}


def service_server_name(registry: str, namespace: str) -> str:
    """The Service's name that TLS clients in the cluster verify."""
    return f"{service(registry)}.{namespace}.svc"


def in_cluster_url(registry: str, namespace: str, scheme: str) -> str:
    return f"{scheme}://{service_host(registry, namespace)}"


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


def policy_selector(registry: str) -> str:
    """The main policy Secret and its shards."""
    return (
        f"{MANAGED_BY_LABEL}={MANAGED_BY},{REGISTRY_LABEL}={registry},"
        f"{COMPONENT_LABEL}={POLICY_COMPONENT}"
    )


def labels(registry: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(registry),
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "berth",
        MANAGED_BY_LABEL: MANAGED_BY,
        REGISTRY_LABEL: registry,
    }


# Seconds a replica of a rolling Deployment serves on after SIGTERM (http.drain_seconds):
# longer than endpoints take to drop it from the Service's routing, here and in kind.
DRAIN_SECONDS = 5
