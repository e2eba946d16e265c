"""Node access: the node proxy's port, its DaemonSet, who holds a contested port, the
KEP-1755 local-registry-hosting ConfigMap, and the hosts the pull Secrets are keyed by.

Pure decisions first (node_access, rendering), then reconcile and granting against the
in-memory API (fake_kube), as in test_reconcile_fake_api and test_granting_fake_api.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import Any

import kopf
import pytest
import yaml

from registry_operator import (
    access,
    credentials,
    granting,
    models,
    node_access,
    reconcile,
    status,
)
from registry_operator.handlers import registries, runtime
from registry_operator.rendering import manifests, names
from tests.registry_operator.fake_kube import FakeKube

OWNER = models.Owner("main", "registries", "reg-uid")


def _claim(
    name: str,
    port: int | None,
    created: str = "2026-01-01T00:00:00Z",
    namespace: str = "ns",
    **extra: Any,
) -> node_access.Claim:
    return node_access.Claim(namespace, name, created, port, **extra)


# --- the default port -----------------------------------------------------------------------


def test_default_port_is_stable_in_range_and_avoids_known_ports() -> None:
    port = names.default_node_port("main", "registries")
    assert port == names.default_node_port("main", "registries") == 5605
    ports = {names.default_node_port(f"r{i}", "ns") for i in range(2000)}
    assert ports <= set(range(5100, 5900))
    assert not ports & names.NODE_PORTS_AVOIDED
    assert len(ports) > 700  # spread over the whole range
    assert names.default_node_port("main", "other") != port  # the namespace counts


def test_port_of_the_spec() -> None:
    def port(raw: dict[str, Any]) -> int | None:
        return node_access.port_of(models.parse_spec(raw, image="i"), OWNER)

    assert port({}) == 5605
    assert port({"nodeProxy": {"port": 5050}}) == 5050
    assert port({"nodeProxy": {"enabled": False, "port": 5050}}) is None


# --- who holds a port, who is published -----------------------------------------------------


def test_the_older_registry_holds_a_contested_port() -> None:
    old = _claim("old", 5200, "2026-01-01T00:00:00Z")
    young = _claim("young", 5200, "2026-02-01T00:00:00Z")
    other = _claim("other", 5300, "2025-01-01T00:00:00Z")
    claims = [young, old, other]
    assert node_access.conflict(old, claims) is None
    assert node_access.conflict(young, claims) == old
    assert node_access.served_port(old, claims) == 5200
    assert node_access.served_port(young, claims) is None
    assert "held by Registry ns/old" in node_access.conflict_message(young, old)
    # Same age: the name decides, so every reconcile decides alike.
    twin = _claim("a-twin", 5200, "2026-01-01T00:00:00Z")
    assert node_access.conflict(old, [*claims, twin]) == twin
    # A Registry being deleted keeps its port until it is gone: its pods still hold it.
    going = _claim("old", 5200, "2026-01-01T00:00:00Z", deleting=True)
    assert node_access.conflict(young, [going, young]) == going
    assert node_access.conflict(young, [young]) is None
    assert node_access.served_port(_claim("off", None), claims) is None


def test_local_registry_hosting_names_the_oldest_unless_one_is_annotated() -> None:
    old = _claim("old", 5200, "2026-01-01T00:00:00Z")
    young = _claim("young", 5300, "2026-02-01T00:00:00Z")
    assert node_access.hosting([young, old]) == old
    assert node_access.hosting([young, old, _claim("new", 5400, "2027-01-01T00:00:00Z")]) == old
    chosen = _claim("young", 5300, "2026-02-01T00:00:00Z", hosting=True)
    assert node_access.hosting([chosen, old]) == chosen
    excluded = _claim("old", 5200, "2026-01-01T00:00:00Z", hosting=False)
    assert node_access.hosting([young, excluded]) == young
    assert node_access.hosting([excluded]) is None
    going = _claim("old", 5200, "2026-01-01T00:00:00Z", deleting=True)
    assert node_access.hosting([young, going]) == young
    # Without a working proxy a Registry cannot be named: no proxy, or a port held by another.
    assert node_access.hosting([_claim("off", None)]) is None
    loser = _claim("loser", 5200, "2026-03-01T00:00:00Z", hosting=True)
    assert node_access.hosting([old, loser]) == old
    assert node_access.hosting([]) is None


def test_claims_of_raw_registries() -> None:
    body = {
        "metadata": {
            "name": "main",
            "namespace": "registries",
            "uid": "u",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {models.LOCAL_REGISTRY_HOSTING_ANNOTATION: "true"},
        },
        "spec": {"ingress": {"host": "r.example.com"}},
    }
    assert node_access.claim_of(body) == node_access.Claim(
        "registries", "main", "2026-01-01T00:00:00Z", 5605, True, False, "r.example.com", "u"
    )
    body["spec"] = {"replicas": 3}  # invalid: no port is claimed
    claim = node_access.claim_of(body)
    assert claim is not None and claim.port is None
    assert node_access.claim_of({"metadata": {}}) is None


def test_pull_hosts() -> None:
    def hosts(raw: dict[str, Any], served: int | None) -> tuple[str, ...]:
        registry = models.Registry(OWNER, 1, models.parse_spec(raw, image="i"))
        return node_access.pull_hosts(registry, served)

    assert hosts({}, 5605) == ("localhost:5605", "main.registries.svc:5000")
    assert hosts({"ingress": {"host": "r.example.com"}}, 5605) == (
        "localhost:5605",
        "r.example.com",
        "main.registries.svc:5000",
    )
    assert hosts({"ingress": {"host": "r.example.com"}}, None) == (
        "r.example.com",
        "main.registries.svc:5000",
    )


# --- rendering --------------------------------------------------------------------------------


def test_the_daemonset_binds_the_port_to_the_node_loopback_only() -> None:
    spec = models.parse_spec({}, image="berth:1")
    daemonset = manifests.node_proxy(spec, OWNER, 5605)
    assert daemonset["metadata"]["name"] == "main-node-proxy"
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "berth:1"  # the server's image, another entrypoint
    assert container["command"] == [
        "python", "-m", "registry_server.node_proxy",
        "--listen", "0.0.0.0:5605",
        "--upstream", "main.registries.svc:5000",
        "--drain-seconds", "10",
        # TLS to the registry, verified with its CA (mounted from the serving Secret).
        "--upstream-ca", "/etc/berth/tls-ca/ca.crt",
    ]  # fmt: skip
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert (mount["name"], mount["mountPath"], mount["readOnly"]) == (
        "registry-ca", "/etc/berth/tls-ca", True
    )  # fmt: skip
    assert volume["secret"]["secretName"] == "main-serving-tls"
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # not the key
    assert container["ports"] == [
        {
            "name": "registry",
            "containerPort": 5605,
            "hostPort": 5605,
            "hostIP": "127.0.0.1",
            "protocol": "TCP",
        }
    ]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "registry"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "registry"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["tolerations"] == [{"operator": "Exists"}]  # control-plane nodes too
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod
    assert pod["terminationGracePeriodSeconds"] > 10  # longer than the drain


def test_proxy_pods_are_never_selected_as_servers() -> None:
    """The Service and the Deployment select the server pods; a proxy pod among them
    would relay to itself (the Service) or be counted as a replica."""
    spec = models.parse_spec({}, image="i")
    daemonset = manifests.node_proxy(spec, OWNER, 5605)
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    server = names.selector_labels("main")
    assert not all(pod_labels.get(k) == v for k, v in server.items())
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert all(pod_labels[k] == v for k, v in selector.items())
    assert pod_labels[names.REGISTRY_LABEL] == "main"
    assert pod_labels[names.COMPONENT_LABEL] == "node-proxy"


@pytest.mark.parametrize(
    ("ingress", "host"), [(None, "localhost:5605"), ("r.example.com", "r.example.com")]
)
def test_the_kep_1755_config_map(ingress: str | None, host: str) -> None:
    config_map = manifests.local_registry_hosting("main", "registries", 5605, ingress)
    assert config_map["metadata"]["namespace"] == "kube-public"
    assert config_map["metadata"]["name"] == "local-registry-hosting"
    assert "ownerReferences" not in config_map["metadata"]
    labels = config_map["metadata"]["labels"]
    assert labels[names.REGISTRY_LABEL] == "main"
    assert labels[names.REGISTRY_NAMESPACE_LABEL] == "registries"
    assert yaml.safe_load(config_map["data"]["localRegistryHosting.v1"]) == {
        "host": host,
        "hostFromContainerRuntime": "localhost:5605",
        "hostFromClusterNetwork": "main.registries.svc:5000",
        "help": names.LOCAL_REGISTRY_HOSTING_HELP,
    }


# --- reconcile --------------------------------------------------------------------------------


def _registry(
    kube: FakeKube,
    name: str,
    spec: dict[str, Any],
    *,
    generation: int = 1,
    created: str = "2026-01-01T00:00:00Z",
    annotations: dict[str, str] | None = None,
) -> None:
    existing = kube.objects.get(("Registry", "ns", name))
    body: dict[str, Any] = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"{name}-uid",
            "generation": generation,
            "creationTimestamp": created,
            "annotations": annotations or {},
        },
        "spec": spec,
    }
    if existing is not None and "status" in existing:
        body["status"] = existing["status"]
    kube.put(body)


def _options() -> reconcile.Options:
    counter = itertools.count(1)
    return reconcile.Options(
        image="img:test",
        generators=credentials.Generators(
            signing_key=credentials.generate_signing_key,
            password=lambda: f"pw-{next(counter)}",
            hash=lambda password: f"$2b$04$fake-{password}",
        ),
        now=lambda: "2026-01-01T00:00:00Z",
    )


def _run(kube: FakeKube, name: str = "main", **kwargs: Any) -> reconcile.Outcome:
    return reconcile.reconcile(kube, "ns", name, _options(), **kwargs)  # type: ignore[arg-type]


def _reasons(outcome: reconcile.Outcome) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in outcome.events]


def _status(kube: FakeKube, name: str = "main") -> dict[str, Any]:
    return dict(kube.objects[("Registry", "ns", name)]["status"])


def _degraded(kube: FakeKube, name: str = "main") -> tuple[str, str]:
    (found,) = [c for c in _status(kube, name)["conditions"] if c["type"] == "Degraded"]
    return found["status"], found["reason"]


HOSTING = ("ConfigMap", "kube-public", "local-registry-hosting")


def _hosting(kube: FakeKube) -> dict[str, Any]:
    return dict(yaml.safe_load(kube.objects[HOSTING]["data"]["localRegistryHosting.v1"]))


def test_the_proxy_is_rendered_published_and_reported() -> None:
    kube = FakeKube()
    _registry(kube, "main", {})
    port = names.default_node_port("main", "ns")
    outcome = _run(kube)
    assert ("Created", "created DaemonSet main-node-proxy") in _reasons(outcome)
    assert _status(kube)["pullEndpoint"] == f"localhost:{port}"
    assert _hosting(kube)["hostFromContainerRuntime"] == f"localhost:{port}"
    assert ("DaemonSet", "ns", "main-node-proxy") in outcome.written
    assert HOSTING in outcome.written  # its watch event is our own echo
    assert _run(kube).events == ()


def test_turning_the_proxy_off_prunes_it_and_unpublishes() -> None:
    kube = FakeKube()
    _registry(kube, "main", {})
    _run(kube)
    _registry(kube, "main", {"nodeProxy": {"enabled": False}}, generation=2)
    outcome = _run(kube)
    assert _reasons(outcome) == [
        # The server's relayed_hosts (the proxy's localhost:<port>) go with the proxy.
        ("Updated", "updated ConfigMap main-config"),
        ("Updated", "updated Deployment main"),
        ("Deleted", "deleted DaemonSet main-node-proxy"),
        ("Deleted", "deleted ConfigMap kube-public/local-registry-hosting"),
    ]
    assert ("DaemonSet", "ns", "main-node-proxy") not in kube.objects
    assert HOSTING not in kube.objects
    assert "pullEndpoint" not in _status(kube)
    _registry(kube, "main", {"nodeProxy": {"port": 5050}}, generation=3)
    _run(kube)
    daemonset = kube.objects[("DaemonSet", "ns", "main-node-proxy")]
    assert daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"] == 5050
    assert _status(kube)["pullEndpoint"] == "localhost:5050"


def test_a_contested_port_stays_with_the_older_registry() -> None:
    kube = FakeKube()
    _registry(kube, "first", {"nodeProxy": {"port": 5050}}, created="2026-01-01T00:00:00Z")
    _registry(kube, "second", {"nodeProxy": {"port": 5050}}, created="2026-02-01T00:00:00Z")
    _run(kube, "first")
    outcome = _run(kube, "second")
    assert ("DaemonSet", "ns", "second-node-proxy") not in kube.objects
    assert "pullEndpoint" not in _status(kube, "second")
    assert _degraded(kube, "second") == ("True", "NodePortConflict")
    assert [(e.type, e.reason) for e in outcome.events if e.type == "Warning"] == [
        ("Warning", "NodePortConflict")
    ]
    assert _status(kube, "first")["pullEndpoint"] == "localhost:5050"
    assert _run(kube, "first").events == ()
    assert _hosting(kube)["hostFromClusterNetwork"] == "first.ns.svc:5000"

    # The older one moves away: the younger gets its proxy at its next reconcile (the
    # operator's Registry event handler wakes it).
    _registry(kube, "first", {"nodeProxy": {"port": 5060}}, generation=2)
    _run(kube, "first")
    outcome = _run(kube, "second")
    assert ("Created", "created DaemonSet second-node-proxy") in _reasons(outcome)
    assert ("Recovered", "no longer degraded (NodePortConflict)") in _reasons(outcome)
    assert _status(kube, "second")["pullEndpoint"] == "localhost:5050"


def test_an_older_registry_appearing_in_the_claims_takes_the_port() -> None:
    """The claims come from the operator's index; a proxy already rendered is pruned when
    an older Registry turns out to hold its port."""
    kube = FakeKube()
    _registry(kube, "main", {"nodeProxy": {"port": 5050}}, created="2026-02-01T00:00:00Z")
    _run(kube)
    older = _claim("elsewhere", 5050, "2025-01-01T00:00:00Z", namespace="other")
    mine = node_access.claim(models.parse_registry(kube.objects[("Registry", "ns", "main")]))
    outcome = _run(kube, claims=[older, mine])
    assert ("Deleted", "deleted DaemonSet main-node-proxy") in _reasons(outcome)
    assert _degraded(kube) == ("True", "NodePortConflict")


def test_the_annotated_registry_is_published_and_moves_back_when_it_goes() -> None:
    kube = FakeKube()
    _registry(kube, "old", {}, created="2026-01-01T00:00:00Z")
    _registry(kube, "new", {}, created="2026-02-01T00:00:00Z")
    _run(kube, "old")
    assert kube.objects[HOSTING]["metadata"]["labels"][names.REGISTRY_LABEL] == "old"
    annotation = {models.LOCAL_REGISTRY_HOSTING_ANNOTATION: "true"}
    _registry(kube, "new", {}, created="2026-02-01T00:00:00Z", annotations=annotation)
    outcome = _run(kube, "new")
    port = names.default_node_port("new", "ns")
    assert (
        "Published",
        f"ConfigMap kube-public/local-registry-hosting names this Registry (localhost:{port})",
    ) in _reasons(outcome)
    assert [(ref["metadata"]["name"], e.reason) for ref, e in outcome.elsewhere] == [
        ("old", "Unpublished")
    ]
    assert kube.objects[HOSTING]["metadata"]["labels"][names.REGISTRY_LABEL] == "new"
    # The annotated one is being deleted: the ConfigMap goes back to the oldest.
    kube.objects[("Registry", "ns", "new")]["metadata"]["deletionTimestamp"] = "now"
    hosting = reconcile.sync_local_registry_hosting(kube, reconcile.list_claims(kube))  # type: ignore[arg-type]
    assert hosting.chosen is not None and hosting.chosen.name == "old"
    assert kube.objects[HOSTING]["metadata"]["labels"][names.REGISTRY_LABEL] == "old"


def test_a_local_registry_hosting_berth_did_not_write_is_left_alone() -> None:
    kube = FakeKube()
    foreign = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "local-registry-hosting", "namespace": "kube-public"},
        "data": {"localRegistryHosting.v1": 'host: "localhost:5001"\n'},
    }
    kube.put(foreign)
    _registry(kube, "main", {})
    _run(kube)
    assert kube.objects[HOSTING]["data"] == foreign["data"]
    _registry(kube, "main", {"nodeProxy": {"enabled": False}}, generation=2)
    _run(kube)
    assert HOSTING in kube.objects


def test_a_deleted_or_edited_local_registry_hosting_is_restored() -> None:
    kube = FakeKube()
    _registry(kube, "main", {})
    _run(kube)
    kube.objects[HOSTING]["data"]["localRegistryHosting.v1"] = "host: elsewhere\n"
    _run(kube)
    assert _hosting(kube)["hostFromClusterNetwork"] == "main.ns.svc:5000"
    kube.delete("v1", "ConfigMap", "kube-public", "local-registry-hosting")
    _run(kube)
    assert HOSTING in kube.objects


def test_a_hand_edited_daemonset_is_repaired() -> None:
    kube = FakeKube()
    _registry(kube, "main", {})
    _run(kube)
    daemonset = kube.objects[("DaemonSet", "ns", "main-node-proxy")]
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostIP"] = "0.0.0.0"
    outcome = _run(kube)
    assert _reasons(outcome) == [("Repaired", "reverted changes made to DaemonSet main-node-proxy")]
    ports = kube.objects[("DaemonSet", "ns", "main-node-proxy")]["spec"]["template"]["spec"]
    assert ports["containers"][0]["ports"][0]["hostIP"] == "127.0.0.1"


# --- granting: the hosts of the pull Secrets --------------------------------------------------


def _granted_hosts(
    spec: dict[str, Any], claims: list[node_access.Claim] | None = None
) -> list[str]:
    kube = FakeKube()
    _registry(kube, "main", spec, created="2026-02-01T00:00:00Z")
    kube.namespace("ns")
    kube.namespace("team-a")
    kube.put(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Repository",
            "metadata": {"name": "api", "namespace": "ns", "generation": 1},
            "spec": {
                "registryRef": {"name": "main"},
                "path": "team-a/api",
                "pullAccess": {"namespaces": ["team-a"]},
            },
        }
    )
    options = granting.Options(
        generators=credentials.Generators(password=lambda: "pw", hash=lambda s: "$2b$05$" + s),
        prober=lambda target, credential: access.UNREACHABLE,
    )
    granting.reconcile_access(kube, "ns", "main", options, claims)  # type: ignore[arg-type]
    secret = kube.objects[("Secret", "team-a", "main-ns-pull")]
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entries = list(config["auths"].values())
    assert all(entry == entries[0] for entry in entries)  # one credential under every host
    return sorted(config["auths"])


def test_pull_secrets_are_keyed_by_every_address_of_the_registry() -> None:
    port = names.default_node_port("main", "ns")
    assert _granted_hosts({}) == [f"localhost:{port}", "main.ns.svc:5000"]
    assert _granted_hosts({"ingress": {"host": "r.example.com"}}) == [
        f"localhost:{port}",
        "main.ns.svc:5000",
        "r.example.com",
    ]
    off = {"ingress": {"host": "r.example.com"}, "nodeProxy": {"enabled": False}}
    assert _granted_hosts(off) == ["main.ns.svc:5000", "r.example.com"]
    # An older Registry holds the port: localhost:<port> would reach its registry, not ours.
    older = _claim("elsewhere", port, "2025-01-01T00:00:00Z", namespace="other")
    assert _granted_hosts({}, [older]) == ["main.ns.svc:5000"]


# --- status -----------------------------------------------------------------------------------


def test_status_names_the_pull_endpoint_or_why_there_is_none() -> None:
    spec = models.parse_spec({}, image="i")
    built = status.build(OWNER, 1, spec, status.Observed(), {}, "now", pull_endpoint="localhost:1")
    assert built["pullEndpoint"] == "localhost:1"
    conflicted = status.build(
        OWNER, 1, spec, status.Observed(), {}, "now", node_port_conflict="held by x"
    )
    assert "pullEndpoint" not in conflicted
    degraded = {c["type"]: c for c in conflicted["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "NodePortConflict",
        "held by x",
    )
    # A failing rollout says more about the registry than the proxy does: it wins.
    failing = {
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [{"type": "ReplicaFailure", "status": "True", "message": "quota"}],
        },
    }
    observed = status.Observed(deployment=failing)
    built = status.build(OWNER, 1, spec, observed, {}, "now", node_port_conflict="held by x")
    assert {c["type"]: c for c in built["conditions"]}["Degraded"]["reason"] == "ReplicaFailure"


# --- the Registry event handler ---------------------------------------------------------------


def _body(name: str, port: int | None, created: str) -> dict[str, Any]:
    spec = {"nodeProxy": {"port": port}} if port else {"nodeProxy": {"enabled": False}}
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created},
        "spec": spec,
    }


async def test_a_changed_claim_wakes_the_registries_sharing_its_port() -> None:
    state = runtime.Runtime(kube=FakeKube())  # type: ignore[arg-type]
    calls: list[tuple[str, ...]] = []

    async def reconcile_(namespace: str, name: str) -> None:
        calls.append(("registry", f"{namespace}/{name}"))

    def access_(namespace: str, name: str) -> None:
        calls.append(("access", f"{namespace}/{name}"))

    async def hosting_() -> None:
        calls.append(("hosting",))

    state.reconcile = reconcile_  # type: ignore[method-assign,assignment]
    state.request_access = access_  # type: ignore[method-assign]
    state.sync_hosting = hosting_  # type: ignore[method-assign]
    bodies = {
        "a": _body("a", 5050, "2026-01-01T00:00:00Z"),
        "b": _body("b", 5050, "2026-02-01T00:00:00Z"),
        "c": _body("c", 5060, "2026-03-01T00:00:00Z"),
    }
    index: dict[str, list[node_access.Claim]] = {}
    for body in bodies.values():
        claim = node_access.claim_of(body)
        assert claim is not None
        index[claim.ref] = [claim]
    state.claims_index = index
    memo = kopf.Memo(berth=state)

    async def event(type_: str | None, name: str) -> list[tuple[str, ...]]:
        calls.clear()
        await registries.registry_changed(
            type=type_, body=kopf.Body(bodies[name]), namespace="ns", name=name, memo=memo
        )
        await asyncio.sleep(0)  # let the spawned tasks run
        await asyncio.sleep(0)
        return sorted(calls)

    for name in bodies:  # the initial listing: resuming reconciles everything anyway
        assert await event(None, name) == []
    assert await event("MODIFIED", "a") == []  # the claim did not change (a status write)
    bodies["a"] = _body("a", 5060, "2026-01-01T00:00:00Z")
    index["ns/a"] = [node_access.claim_of(bodies["a"])]  # type: ignore[list-item]
    # a left 5050 (b may take it) and joined 5060 (c now conflicts with a).
    assert await event("MODIFIED", "a") == [
        ("access", "ns/b"),
        ("access", "ns/c"),
        ("hosting",),
        ("registry", "ns/b"),
        ("registry", "ns/c"),
    ]
    del index["ns/a"]
    assert await event("DELETED", "a") == [("access", "ns/c"), ("hosting",), ("registry", "ns/c")]
