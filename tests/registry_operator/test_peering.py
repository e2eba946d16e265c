"""peering: which Registries replicate with each other and how each peer is wired.

Pure, so the decisions are pinned down here by table: the "both list each other" rule,
who is told of a spec change, which peer accounts a registry keeps, and every reason a
peer is left out of the server's configuration.
"""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from registry_operator import credentials, models, peering, robots, status
from registry_operator.handlers import registries
from registry_operator.rendering import manifests

IMAGE = "berth:test"


def _body(
    name: str,
    namespace: str = "registries",
    peers: list[Any] | None = None,
    *,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"image": IMAGE, "storage": {"emptyDir": {}}}
    if peers is not None:
        spec["region"] = f"region-{name}"
        spec["replication"] = {"peers": peers}
    return {"apiVersion": "berth.dev/v1alpha1", "kind": "Registry", "metadata": meta, "spec": spec}


def _ref(name: str, namespace: str | None = None) -> dict[str, Any]:
    ref = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"name": f"to-{name}", "registryRef": ref}


URL_PEER = {
    "name": "far",
    "url": "https://far.example.com",
    "credentialsSecretRef": {"name": "far-creds"},
}
INVALID = {"name": "Not A Label", "registryRef": {"name": "x"}}


def _registry(body: dict[str, Any]) -> models.Registry:
    return models.parse_registry(body, image=IMAGE)


MAIN = _registry(_body("main", peers=[_ref("eu"), _ref("us", "other"), URL_PEER]))


# --- the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (_body("eu", peers=[_ref("main")]), True),
        (_body("eu", peers=[_ref("main", "registries")]), True),  # explicit namespace
        (_body("us", "other", peers=[_ref("main", "registries")]), True),
        (_body("us", "other", peers=[_ref("main")]), False),  # means other/main
        (_body("eu", peers=[_ref("elsewhere")]), False),
        (_body("eu"), False),  # no peers at all
        (_body("asia", peers=[_ref("main")]), False),  # lists main, main does not list it
    ],
)
def test_mutual_needs_both_to_list_each_other(other: dict[str, Any], expected: bool) -> None:
    parsed = _registry(other)
    assert peering.mutual(MAIN, parsed) is expected
    assert peering.mutual(parsed, MAIN) is expected


def test_listed_keeps_the_spec_order_and_skips_url_peers() -> None:
    assert peering.listed(MAIN) == [
        models.RegistryRef("eu", "registries"),
        models.RegistryRef("us", "other"),
    ]


# --- who is told of a spec change ------------------------------------------------------------


@pytest.mark.parametrize(
    ("everyone", "expected"),
    [
        ([], []),
        ([_body("main", peers=[_ref("eu")])], []),  # itself
        ([_body("eu")], [("registries", "eu")]),  # listed by main, lists nobody
        ([_body("us", "other")], [("other", "us")]),
        ([_body("asia", peers=[_ref("main")])], [("registries", "asia")]),  # lists main
        ([_body("asia", "far", peers=[_ref("main", "registries")])], [("far", "asia")]),
        ([_body("asia", "far", peers=[_ref("main")])], []),  # means far/main
        ([_body("asia", peers=[_ref("eu")])], []),  # unrelated
        # A Registry whose spec does not parse still names its peers.
        ([_body("asia", peers=[INVALID, _ref("main")])], [("registries", "asia")]),
        ([_body("asia", peers=["junk", URL_PEER])], []),
        (
            [_body("eu"), _body("asia", peers=[_ref("main")]), _body("zz")],
            [("registries", "eu"), ("registries", "asia")],
        ),
    ],
)
def test_to_tell(everyone: list[dict[str, Any]], expected: list[tuple[str, str]]) -> None:
    found = peering.to_tell(MAIN, everyone)
    assert [(ref.namespace, ref.name) for ref in found] == expected
    # The operator's index keeps only a stub of each Registry: the same answer.
    assert peering.to_tell(MAIN, [peering.peers_stub(body) for body in everyone]) == found


def test_the_stub_keeps_the_name_and_the_peers_only() -> None:
    body = _body("asia", "far", peers=[_ref("main"), URL_PEER])
    body["status"] = {"observedGeneration": 3, "conditions": [{"type": "Ready"}]}
    stub = peering.peers_stub(body)
    assert stub == {
        "metadata": {"name": "asia", "namespace": "far"},
        "spec": {"replication": {"peers": [_ref("main"), URL_PEER]}},
    }
    body["spec"]["replication"]["peers"].clear()  # a copy, not the event's body
    assert len(stub["spec"]["replication"]["peers"]) == 2
    assert peering.peers_stub(_body("eu")) == {
        "metadata": {"name": "eu", "namespace": "registries"}
    }


# --- which peer accounts a registry keeps -----------------------------------------------------

EU = models.RegistryRef("eu", "registries")
US = models.RegistryRef("us", "other")


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ([], ()),
        ([(EU, None), (US, None)], ()),  # missing
        ([(EU, _body("eu", peers=[_ref("main")]))], ("peer.registries.eu",)),
        ([(EU, _body("eu", peers=[_ref("main")], deleting=True))], ()),
        ([(EU, _body("eu", peers=[INVALID, _ref("main")]))], ()),  # invalid spec
        ([(EU, _body("eu", peers=[_ref("other")]))], ()),  # does not list main
        (
            [
                (US, _body("us", "other", peers=[_ref("main", "registries")])),
                (EU, _body("eu", peers=[_ref("main")])),
            ],
            ("peer.other.us", "peer.registries.eu"),  # sorted
        ),
    ],
)
def test_consenting(
    found: list[tuple[models.RegistryRef, dict[str, Any] | None]], expected: tuple[str, ...]
) -> None:
    assert peering.consenting(MAIN, found) == expected


# --- wiring ----------------------------------------------------------------------------------

EU_PEER, US_PEER, FAR_PEER = MAIN.spec.peers
EU_URL = "https://eu.registries.svc:5000"
EU_CA = "-----BEGIN CERTIFICATE-----\neu-ca\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        (None, "PeerNotFound", "Registry registries/eu does not exist"),
        (
            _body("eu", peers=[INVALID]),
            "PeerInvalid",
            "spec.replication.peers[0].name: 'Not A Label' is not a DNS label",
        ),
        (
            _body("eu", peers=[_ref("other")]),
            "NotMutual",
            "Registry registries/eu does not list this Registry as a peer; both must",
        ),
        (
            _body("eu"),
            "NotMutual",
            "Registry registries/eu does not list this Registry as a peer; both must",
        ),
    ],
)
def test_refusal(body: dict[str, Any] | None, reason: str, message: str) -> None:
    refused = peering.refusal(MAIN, EU_PEER, body)
    assert refused == peering.Resolved(status.PeerState("to-eu", EU_URL, reason, message))


def test_a_consenting_peer_is_not_refused() -> None:
    assert peering.refusal(MAIN, EU_PEER, _body("eu", peers=[_ref("main")])) is None


def _account(key: str) -> robots.Robot:
    generators = credentials.Generators(password=lambda: "pw", hash=lambda secret: "hash")
    return robots.new(key, 1_800_000_000.0, generators)


def test_in_cluster_waits_for_the_account_the_peer_makes() -> None:
    for data in ({}, {"peer.registries.other": robots.dump(_account("peer.registries.other"))}):
        assert peering.in_cluster(MAIN, EU_PEER, data, "https", EU_CA) == peering.Resolved(
            status.PeerState(
                "to-eu",
                EU_URL,
                "WaitingForCredentials",
                "waiting for Registry registries/eu to create the account this one replicates with",
            ),
            waiting_on=EU,
        )
    unreadable = {"peer.registries.main": "not json"}
    assert peering.in_cluster(MAIN, EU_PEER, unreadable, "https", EU_CA).waiting_on == EU


def test_in_cluster_wires_the_account_and_the_peers_ca() -> None:
    account = _account("peer.registries.main")
    data = {"peer.registries.main": robots.dump(account)}
    resolved = peering.in_cluster(MAIN, EU_PEER, data, "https", EU_CA)
    assert resolved == peering.Resolved(
        status.PeerState("to-eu", EU_URL),
        manifests.WiredPeer(
            name="to-eu",
            url=EU_URL,
            kind="berth",
            username=account.current.name,
            secret="main-replication",
            key="to-eu",
            ca_pem=EU_CA,
        ),
        password="pw",
    )
    # A peer with spec.tls Disabled: plain HTTP, no CA.
    plain = peering.in_cluster(MAIN, EU_PEER, data, "http", None)
    assert plain.wired is not None
    assert (plain.wired.url, plain.wired.ca_pem) == ("http://eu.registries.svc:5000", None)


def test_in_cluster_waits_for_the_peers_ca() -> None:
    """Never wired to a TLS peer without its CA: the server would refuse it (or, worse,
    be configured to trust anything)."""
    account = _account("peer.registries.main")
    data = {"peer.registries.main": robots.dump(account)}
    resolved = peering.in_cluster(MAIN, EU_PEER, data, "https", None)
    assert resolved.wired is None
    assert resolved.state.reason == "WaitingForCertificate"


@pytest.mark.parametrize(
    "secret",
    [
        {},
        {"username": "u"},
        {"password": "p"},
        {"username": "", "password": "p"},
        {"username": " \n", "password": "p"},
        {"username": "u", "password": "\n"},
    ],
)
def test_by_url_needs_username_and_password(secret: dict[str, str]) -> None:
    assert peering.by_url(FAR_PEER, secret) == peering.Resolved(
        status.PeerState(
            "far",
            "https://far.example.com",
            "CredentialsMissing",
            "Secret far-creds needs the keys username and password",
        )
    )


def test_by_url_refuses_a_username_basic_cannot_carry() -> None:
    resolved = peering.by_url(FAR_PEER, {"username": "a:b", "password": "p"})
    assert resolved.wired is None
    assert resolved.state.reason == "CredentialsInvalid"


def test_by_url_wires_the_secret_without_copying_the_credentials() -> None:
    resolved = peering.by_url(FAR_PEER, {"username": "u", "password": "p"})
    assert resolved == peering.Resolved(
        status.PeerState("far", "https://far.example.com"),
        manifests.WiredPeer(
            "far", "https://far.example.com", "berth", "", "far-creds", "password",
            username_key="username",
        ),
    )  # fmt: skip


def test_wiring_keeps_the_order_and_the_same_cluster_passwords() -> None:
    wired_eu = peering.in_cluster(
        MAIN,
        EU_PEER,
        {"peer.registries.main": robots.dump(_account("peer.registries.main"))},
        "https",
        EU_CA,
    )
    waiting_us = peering.in_cluster(MAIN, US_PEER, {}, "https", EU_CA)
    far = peering.by_url(FAR_PEER, {"username": "u", "password": "p"})
    wiring = peering.wiring([wired_eu, waiting_us, far])
    assert wiring.replication.peers == (wired_eu.wired, far.wired)
    assert wiring.replication.passwords == {"to-eu": "pw"}
    assert wiring.states == (wired_eu.state, waiting_us.state, far.state)
    assert wiring.waiting_on == (US,)
    assert peering.wiring([]) == peering.Wiring(manifests.Replication(), (), ())


def test_the_operator_indexes_every_registry_by_namespace_and_name() -> None:
    body = _body("asia", "far", peers=[_ref("main")])
    found = registries.index_peers(kopf.Body(body))
    poll = {"external": False, "deleting": False}
    assert found == {"far/asia": {**peering.peers_stub(body), "poll": poll}}
