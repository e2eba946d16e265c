"""Replication wired by the operator, on a real control plane with real servers.

Two Registries, in two namespaces, list each other as peers. The operator makes an
account for each on the other and writes the peers into both server configs; both
servers start from the rendered pod specs (tests/support/podspec_runner.py, with the
Services' DNS names standing in as loopback URLs), an image pushed to one becomes
pullable from the other, and the operator copies each server's per-peer replication
status into its Registry.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.integration.test_auth_clients import SECRETS, start_auth_registry
from tests.support import podspec_runner
from tests.support.clients import skopeo
from tests.support.control_plane import ControlPlane
from tests.support.images import make_oci_layout
from tests.support.operator_process import (
    OperatorProcess,
    delete_berth_objects,
    operator_running,
)
from tests.support.operator_process import wait_for as _wait
from tests.support.processes import RegistryProcess, ReservedPort
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, overrides: Path
) -> Iterator[OperatorProcess]:
    with operator_running(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        "--resync-seconds=60",
        "--replication-poll-seconds=1",
        f"--endpoint-overrides={overrides}",
    ) as running:
        yield running


@pytest.fixture
def second_namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"us-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        delete_berth_objects(control_plane, name)
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _registry(
    plane: ControlPlane, namespace: str, name: str, region: str, peers: list[Any]
) -> None:
    document = {
        "apiVersion": API,
        "kind": "Registry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "region": region,
            "storage": {"emptyDir": {}},
            "replication": {"peers": peers},
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(document))


def _config(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any]:
    config_map = kube.find("v1", "ConfigMap", namespace, names.config_map(name))
    if config_map is None:
        return {}
    return dict(yaml.safe_load(config_map["data"]["config.yaml"]))


def _secret(kube: kube_client.Client, namespace: str, name: str) -> dict[str, str]:
    secret = kube.get("v1", "Secret", namespace, name)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def _registry_status(kube: kube_client.Client, namespace: str, name: str) -> dict[str, Any]:
    return dict(kube.get(API, "Registry", namespace, name).get("status") or {})


def _condition(kube: kube_client.Client, namespace: str, name: str, type_: str) -> tuple[str, str]:
    for condition in _registry_status(kube, namespace, name).get("conditions") or []:
        if condition["type"] == type_:
            return condition["status"], condition["reason"]
    return "", ""


def _mounting_replication(kube: kube_client.Client, ns: str, name: str) -> Any:
    deployment = kube.find("apps/v1", "Deployment", ns, name)
    if deployment is None:  # the ConfigMap is applied first
        return None
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return deployment if any(v["name"] == "replication" for v in volumes) else None


def _push(layout: Path, host: str, creds: str, tag: str) -> None:
    """The image in ``layout`` (tag v1) pushed as team-a/api:<tag>."""
    skopeo(
        "copy", "--dest-tls-verify=false", f"--dest-creds={creds}",
        f"oci:{layout}:v1", f"docker://{host}/team-a/api:{tag}",
    )  # fmt: skip


def _serves(host: str, creds: str, digest: str) -> bool:
    """Whether the registry at ``host`` serves team-a/api@<digest> to ``creds``."""
    result = skopeo(
        "inspect", "--raw", "--tls-verify=false", f"--creds={creds}",
        f"docker://{host}/team-a/api@{digest}", check=False,
    )  # fmt: skip
    return result.returncode == 0


def _wire(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    eu_ns: str,
    us_ns: str,
) -> None:
    """Apply eu and us listing each other; check each config lists the other with the
    account the other's policy made for it."""
    _registry(
        control_plane,
        eu_ns,
        "eu",
        "eu",
        [{"name": "us", "registryRef": {"name": "us", "namespace": us_ns}}],
    )
    # Only one side lists the other: nothing is wired, and the status says why.
    _wait(
        lambda: _condition(kube, eu_ns, "eu", "ReplicationHealthy") == ("False", "PeerNotFound"),
        operator,
        "PeerNotFound",
    )
    _registry(
        control_plane,
        us_ns,
        "us",
        "us",
        [{"name": "eu", "registryRef": {"name": "eu", "namespace": eu_ns}}],
    )

    # Wired: each config lists the other, with the account the other's policy made for it.
    eu_config = _wait(
        lambda: (c := _config(kube, eu_ns, "eu")).get("replication") and c, operator, "eu's peers"
    )
    us_config = _wait(
        lambda: (c := _config(kube, us_ns, "us")).get("replication") and c, operator, "us's peers"
    )
    assert eu_config["replication"] == {
        "region": "eu",
        "peers": [
            {
                "name": "us",
                "url": f"https://us.{us_ns}.svc:5000",
                "kind": "berth",
                "username": f"peer.{eu_ns}.eu.1",
                "password_file": "/etc/berth/replication/us",
                "ca_file": f"/etc/berth/config/{names.peer_ca_file('us')}",
            }
        ],
    }
    assert us_config["replication"]["peers"][0]["username"] == f"peer.{us_ns}.us.1"
    assert us_config["replication"]["peers"][0]["url"] == f"https://eu.{eu_ns}.svc:5000"
    # Each verifies the other with the other's own CA, copied into its ConfigMap.
    for here, local, there, peer in ((eu_ns, "eu", us_ns, "us"), (us_ns, "us", eu_ns, "eu")):
        config_map = kube.get("v1", "ConfigMap", here, names.config_map(local))
        theirs = _secret(kube, there, names.serving_secret(peer))["ca.crt"]
        assert config_map["data"][names.peer_ca_file(peer)] == theirs
    for here, there, peer in ((eu_ns, us_ns, "us"), (us_ns, eu_ns, "eu")):
        local = "eu" if here == eu_ns else "us"
        password = _secret(kube, here, names.replication_secret(local))[peer]
        account = f"peer.{here}.{local}.1"

        def policy_of_peer(there: str = there, peer: str = peer) -> dict[str, Any]:
            return dict(
                yaml.safe_load(_secret(kube, there, names.policy_secret(peer))["policy.yaml"])
            )

        policy = _wait(
            lambda account=account: account in (p := policy_of_peer())["admins"] and p,
            operator,
            f"{account} in the policy of {peer}",
        )
        hashed = next(u["password_hash"] for u in policy["users"] if u["name"] == account)
        assert bcrypt.checkpw(password.encode(), hashed.encode())
        assert "password" not in json.dumps(_config(kube, here, local)).replace("password_file", "")


def test_two_registries_listing_each_other_get_wired(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    second_namespace: str,
) -> None:
    _wire(operator, kube, control_plane, namespace, second_namespace)
    # Dropping the peer on one side unwires both: no account for it any more either.
    _registry(control_plane, second_namespace, "us", "us", [])
    _wait(
        lambda: _condition(kube, namespace, "eu", "ReplicationHealthy") == ("False", "NotMutual"),
        operator,
        "NotMutual on eu",
    )
    _wait(lambda: "replication" not in _config(kube, namespace, "eu"), operator, "eu unwired")

    def policy() -> dict[str, Any]:
        secret = _secret(kube, second_namespace, names.policy_secret("us"))
        return dict(yaml.safe_load(secret["policy.yaml"]))

    _wait(lambda: not policy().get("users"), operator, "eu's account on us to go")
    assert f"peer.{namespace}.eu.1" not in policy()["admins"]


def test_wired_servers_replicate_and_the_status_shows_per_peer_lag(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    second_namespace: str,
    overrides: Path,
    tmp_path: Path,
) -> None:
    require_tool("skopeo")
    eu_ns, us_ns = namespace, second_namespace
    _wire(operator, kube, control_plane, eu_ns, us_ns)

    # Both servers from the rendered pods, the Services' names pointing at each other.
    # Known before the servers start (the operator and the peers are told them); held
    # until each server is about to bind its own.
    reserved = {"eu": ReservedPort(), "us": ReservedPort()}
    ports = {name: r.port for name, r in reserved.items()}
    # HTTPS everywhere: the peers verify each other's generated certificates (they name
    # 127.0.0.1 too, which stands in for the Services' addresses here).
    services = {
        f"https://eu.{eu_ns}.svc:5000": f"https://127.0.0.1:{ports['eu']}",
        f"https://us.{us_ns}.svc:5000": f"https://127.0.0.1:{ports['us']}",
    }
    endpoints = {f"{eu_ns}/eu": f"https://127.0.0.1:{ports['eu']}"}
    endpoints[f"{us_ns}/us"] = f"https://127.0.0.1:{ports['us']}"
    overrides.write_text(json.dumps(endpoints))
    pods: list[podspec_runner.RunningPod] = []
    try:
        for ns, name in ((eu_ns, "eu"), (us_ns, "us")):
            # The ConfigMap is applied before the Deployment: wait for the pod template
            # that mounts the replication credentials too.
            deployment = _wait(
                functools.partial(_mounting_replication, kube, ns, name),
                operator,
                f"{name}'s Deployment mounting the replication credentials",
            )
            inputs = _wait(
                lambda ns=ns, deployment=deployment: podspec_runner.inputs(
                    lambda kind, n, o: kube.find("v1", kind, n, o), ns, deployment
                ),
                operator,
                f"{name}'s ConfigMaps and Secrets",
            )
            pods.append(
                podspec_runner.start(
                    deployment,
                    *inputs,
                    tmp_path / name,
                    port=reserved[name].release(),
                    services=services,
                )
            )
        eu_pod, us_pod = pods
        admin = {
            name: _secret(kube, ns, names.secret(name))
            for ns, name in ((eu_ns, "eu"), (us_ns, "us"))
        }
        creds = {name: f"{a['admin-username']}:{a['admin-password']}" for name, a in admin.items()}

        digest = make_oci_layout(tmp_path / "image", "v1", layers=2, seed="replicated")
        pushed = time.monotonic()
        _push(tmp_path / "image", eu_pod.host, creds["eu"], "v1")
        pullable_in_us = functools.partial(_serves, us_pod.host, creds["us"], digest)
        _wait(pullable_in_us, operator, "the image in us", timeout=30)
        print(f"\npushed to eu -> pullable in us: {time.monotonic() - pushed:.2f}s")
        back = skopeo(
            "inspect", "--tls-verify=false", f"--creds={creds['us']}",
            f"docker://{us_pod.host}/team-a/api:v1",
        )  # fmt: skip
        assert json.loads(back.stdout)["Digest"] == digest

        # The operator copies eu's view of its peer into the Registry status.
        def delivered() -> dict[str, Any] | None:
            peers = (_registry_status(kube, eu_ns, "eu").get("replication") or {}).get(
                "peers"
            ) or []
            return peers[0] if peers and peers[0].get("delivered", 0) >= 1 else None

        peer = _wait(delivered, operator, "the per-peer status of eu", timeout=30)
        assert peer["name"] == "us" and peer["wired"] is True
        assert peer["queueDepth"] == 0
        assert peer["lagSeconds"] >= 0.0
        assert "lastSuccessTime" in peer
        _wait(
            lambda: _condition(kube, eu_ns, "eu", "ReplicationHealthy") == ("True", "Replicating"),
            operator,
            "ReplicationHealthy on eu",
        )
        _wait(
            lambda: _condition(kube, us_ns, "us", "ReplicationHealthy") == ("True", "Replicating"),
            operator,
            "ReplicationHealthy on us",
        )
        assert _registry_status(kube, us_ns, "us")["replication"]["region"] == "us"

        # A peer that is down shows in the status: queued changes, their age, the error.
        us_pod.stop()
        _push(tmp_path / "image", eu_pod.host, creds["eu"], "v2")

        def queued() -> dict[str, Any] | None:
            peers = (_registry_status(kube, eu_ns, "eu").get("replication") or {}).get(
                "peers"
            ) or []
            return (
                peers[0]
                if peers
                and peers[0].get("queueDepth", 0) >= 1
                and peers[0].get("lagSeconds", 0) > 1
                else None
            )

        lagging = _wait(queued, operator, "queued changes with a lag", timeout=30)
        print(
            f"with us down: queueDepth {lagging['queueDepth']}, lagSeconds {lagging['lagSeconds']}"
        )
        _wait(
            lambda: _condition(kube, eu_ns, "eu", "ReplicationHealthy") == ("False", "PeerErrors"),
            operator,
            "PeerErrors on eu",
        )
    finally:
        for pod in pods:
            pod.stop()
        for port in reserved.values():
            port.release()


def test_a_peer_by_url_replicates_with_the_account_its_secret_holds(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
) -> None:
    """A peer in another cluster: the operator mounts both keys of its Secret, the rendered
    pod's server reads the account from them (nothing of it in the config) and replicates
    into the peer, a Berth with the policy's admin."""
    require_tool("skopeo")
    far = start_auth_registry(registry_process, tmp_path)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "far-creds", "namespace": namespace},
        "stringData": {"username": "root", "password": SECRETS["root"]},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(secret))
    peer = {"name": "far", "url": far.process.url, "credentialsSecretRef": {"name": "far-creds"}}
    _registry(control_plane, namespace, "main", "eu", [peer])
    config = _wait(
        lambda: (c := _config(kube, namespace, "main")).get("replication") and c, operator, "peers"
    )
    wired = config["replication"]["peers"][0]
    assert "username" not in wired
    assert wired["username_file"] == "/etc/berth/replication/far.username"
    deployment = _wait(
        functools.partial(_mounting_replication, kube, namespace, "main"),
        operator,
        "the Deployment mounting the peer's Secret",
    )
    inputs = _wait(
        lambda: podspec_runner.inputs(
            lambda kind, n, o: kube.find("v1", kind, n, o), namespace, deployment
        ),
        operator,
        "the ConfigMaps and Secrets",
    )
    pod = podspec_runner.start(deployment, *inputs, tmp_path / "main")
    try:
        admin = _secret(kube, namespace, names.secret("main"))
        creds = f"{admin['admin-username']}:{admin['admin-password']}"
        digest = make_oci_layout(tmp_path / "image", "v1", layers=2, seed="by-url")
        _push(tmp_path / "image", pod.host, creds, "v1")
        at_the_peer = functools.partial(_serves, far.host, f"root:{SECRETS['root']}", digest)
        _wait(at_the_peer, operator, "the image at the peer", timeout=30)
    except BaseException:
        print(pod.log_tail())
        raise
    finally:
        pod.stop()
