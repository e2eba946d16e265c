"""granting.reconcile_access() against the in-memory API: what is written, in which order,
what is never touched, and what the Repositories are told."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import itertools
import json
from typing import Any

import yaml

from registry_operator import access, credentials, granting, models, robots
from registry_operator.kube import errors
from registry_operator.rendering import grants, names
from tests.registry_operator.fake_kube import FakeKube

NS = "registries"
PULL = "main-registries-pull"


def _kube() -> FakeKube:
    kube = FakeKube()
    kube.put(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Registry",
            "metadata": {"name": "main", "namespace": NS, "uid": "reg-uid", "generation": 1},
            "spec": {},
        }
    )
    for name, labels in (
        (NS, {}),
        ("team-a", {}),
        ("team-b", {"berth.dev/pull": "yes"}),
        ("team-c", {}),
    ):
        kube.namespace(name, labels)
    return kube


def _repository(kube: FakeKube, name: str, spec: dict[str, Any], **meta: Any) -> None:
    kube.put(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Repository",
            "metadata": {
                "name": name,
                "namespace": NS,
                "generation": 1,
                "creationTimestamp": meta.pop("created", "2026-01-01T00:00:00Z"),
                **meta,
            },
            "spec": {"registryRef": {"name": "main"}, **spec},
        }
    )


def _service_account(kube: FakeKube, namespace: str, name: str, pulls: list[str]) -> None:
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
            "imagePullSecrets": [{"name": p} for p in pulls],
        }
    )


class Clock:
    """The time, and a counter for generated secrets shared by all runs of one test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.counter = itertools.count(1)

    def __call__(self) -> float:
        return self.now


def _options(clock: Clock, answer: str = access.UNREACHABLE) -> granting.Options:
    return granting.Options(
        generators=credentials.Generators(
            password=lambda: f"secret-{next(clock.counter)}",
            hash=lambda secret: "$2b$05$" + secret.rjust(53, "x"),
        ),
        prober=lambda target, credential: answer,
        clock=clock,
        workers=4,
    )


def _run(kube: FakeKube, options: granting.Options) -> granting.Outcome:
    return granting.reconcile_access(kube, NS, "main", options)  # type: ignore[arg-type]


def _dockerconfig(kube: FakeKube, namespace: str, name: str = PULL) -> dict[str, Any]:
    secret = kube.objects[("Secret", namespace, name)]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    data = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    # Kubelets pull through the node proxy; in-cluster clients may use the Service.
    port = names.default_node_port("main", NS)
    assert list(data["auths"]) == [f"localhost:{port}", "main.registries.svc:5000"]
    entry = data["auths"]["main.registries.svc:5000"]
    assert data["auths"][f"localhost:{port}"] == entry
    return dict(entry)


def _policy(kube: FakeKube) -> dict[str, Any]:
    """The main file with its shards' robots and rules merged in (a robot spread over
    several shards once, with all its grants)."""
    secret = kube.objects[("Secret", NS, "main-policy")]
    main = dict(yaml.safe_load(base64.b64decode(secret["data"]["policy.yaml"])))
    robots_by_name: dict[str, dict[str, Any]] = {}
    rules: list[dict[str, Any]] = []
    for i, ref in enumerate(main.pop("shards")):
        shard_secret = kube.objects[("Secret", NS, f"main-policy-{i}")]
        raw = base64.b64decode(shard_secret["data"][ref["file"]])
        assert hashlib.sha256(raw).hexdigest() == ref["sha256"]
        shard = json.loads(gzip.decompress(raw))
        for robot in shard.get("robots", []):
            known = robots_by_name.setdefault(robot["name"], {**robot, "access": []})
            known["access"] += robot["access"]
        rules += shard.get("rules", [])
    if robots_by_name:
        main["robots"] = sorted(robots_by_name.values(), key=lambda r: r["name"])
    if rules:
        main["rules"] = rules
    return main


def _status(kube: FakeKube, name: str) -> dict[str, Any]:
    return dict(kube.objects[("Repository", NS, name)]["status"])


def _conditions(kube: FakeKube, name: str) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in _status(kube, name)["conditions"]}


API = {
    "path": "team-a/api",
    "pullAccess": {
        "namespaces": ["team-a"],
        "namespaceSelector": {"matchLabels": {"berth.dev/pull": "yes"}},
    },
}


def test_fan_out_writes_policy_first_then_secrets_and_status() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "api", API)
    outcome = _run(kube, _options(clock))
    creds = _dockerconfig(kube, "team-a")
    assert creds["username"] == "pull.team-a.1"
    assert _dockerconfig(kube, "team-b")["username"] == "pull.team-b.1"
    assert ("Secret", "team-c", PULL) not in kube.objects
    labels = kube.objects[("Secret", "team-a", PULL)]["metadata"]["labels"]
    assert labels[names.REGISTRY_NAMESPACE_LABEL] == NS
    assert labels[names.COMPONENT_LABEL] == "pull-secret"

    robots_by_name = {r["name"]: r for r in _policy(kube)["robots"]}
    assert robots_by_name["pull.team-a.1"]["access"] == [
        {"repository": "team-a/api", "actions": ["pull"]}
    ]
    order = [c for c in kube.calls if c[0] in ("apply", "create") and c[1] == "Secret"]
    # The robots, then the policy's shard, then its main file naming the shard by digest.
    assert [c[3] for c in order[:3]] == ["main-robots", "main-policy-0", "main-policy"]

    status = _status(kube, "api")
    assert status["pullSecretNamespaces"] == ["team-a", "team-b"]
    assert status["pullSecretName"] == PULL
    assert status["credentialsRotatedAt"] == "2027-01-15T08:00:00Z"
    assert _conditions(kube, "api")["Ready"] == ("True", "Granted")
    assert [(e.reason, e.message) for _, e in outcome.events] == [
        ("Granted", "pull Secret written to team-a, team-b")
    ]
    assert outcome.interest.concerns("team-a", {})
    assert outcome.interest.concerns("new", {"berth.dev/pull": "yes"})
    assert not outcome.interest.concerns("new", {})

    calls = len(kube.calls)
    again = _run(kube, _options(clock))
    assert again.events == ()
    assert [c for c in kube.calls[calls:] if c[0] != "apply" or c[1] != "Repository"] == []


def test_new_and_relabelled_namespaces_gain_and_lose_their_secret() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "api", API)
    _run(kube, _options(clock))
    team_a = _dockerconfig(kube, "team-a")
    kube.namespace("team-d", {"berth.dev/pull": "yes"})
    kube.namespace("team-b", {})
    outcome = _run(kube, _options(clock))
    assert ("Secret", "team-b", PULL) not in kube.objects
    assert _dockerconfig(kube, "team-d")["username"] == "pull.team-d.1"
    assert _dockerconfig(kube, "team-a") == team_a  # untouched
    assert {r["name"] for r in _policy(kube)["robots"]} == {"pull.team-a.1", "pull.team-d.1"}
    assert sorted((e.reason, e.message) for _, e in outcome.events) == [
        ("Granted", "pull Secret written to team-d"),
        ("Revoked", "pull Secret removed from team-b"),
    ]


def test_a_foreign_secret_is_never_overwritten() -> None:
    kube, clock = _kube(), Clock()
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": PULL, "namespace": "team-a"},
            "type": "Opaque",
            "data": {"mine": "eA=="},
        }
    )
    _repository(kube, "api", API)
    _run(kube, _options(clock))
    assert kube.objects[("Secret", "team-a", PULL)]["data"] == {"mine": "eA=="}
    assert _conditions(kube, "api")["Ready"][1] == "SecretConflict"
    assert _status(kube, "api")["pullSecretNamespaces"] == ["team-b"]


def test_service_accounts_get_the_secret_without_losing_their_own_entries() -> None:
    kube, clock = _kube(), Clock()
    _service_account(kube, "team-a", "default", ["theirs", PULL])
    _service_account(kube, "team-b", "default", ["theirs"])
    spec = {**API, "pullAccess": {**API["pullAccess"], "serviceAccounts": ["default", "ci"]}}
    _repository(kube, "api", spec)
    _run(kube, _options(clock))
    team_b = kube.objects[("ServiceAccount", "team-b", "default")]
    assert team_b["imagePullSecrets"] == [{"name": "theirs"}, {"name": PULL}]
    assert team_b["metadata"]["annotations"][names.ADDED_PULL_SECRETS_ANNOTATION] == PULL
    # Listed already before Berth: not recorded as Berth's, so never removed by it.
    team_a = kube.objects[("ServiceAccount", "team-a", "default")]
    assert team_a["imagePullSecrets"] == [{"name": "theirs"}, {"name": PULL}]
    assert names.ADDED_PULL_SECRETS_ANNOTATION not in (team_a["metadata"].get("annotations") or {})
    ready = next(c for c in _status(kube, "api")["conditions"] if c["type"] == "Ready")
    assert "ServiceAccount team-a/ci does not exist yet" in ready["message"]

    # Revoked everywhere: Berth's entries go, everyone else's stay.
    _repository(kube, "api", {"path": "team-a/api"})
    _run(kube, _options(clock))
    assert ("Secret", "team-b", PULL) not in kube.objects
    team_b = kube.objects[("ServiceAccount", "team-b", "default")]
    assert team_b["imagePullSecrets"] == [{"name": "theirs"}]
    team_a = kube.objects[("ServiceAccount", "team-a", "default")]
    assert team_a["imagePullSecrets"] == [{"name": "theirs"}, {"name": PULL}]


class _Webhooked(FakeKube):
    """An admission webhook refusing changes to some ServiceAccounts and Secrets."""

    refuse: set[tuple[str, str, str]] = set()

    def _check(self, kind: str, namespace: str, name: str) -> None:
        if (kind, namespace, name) in self.refuse:
            raise errors.Rejected('admission webhook "policy.example.com" denied it', 403)

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, *args: Any, **kw: Any
    ) -> Any:
        self._check(kind, namespace, name)
        return super().patch(api_version, kind, namespace, name, *args, **kw)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._check(kind, namespace, name)
        super().delete(api_version, kind, namespace, name)


def test_a_refused_service_account_or_secret_change_stops_only_its_own_secret() -> None:
    """One object the API server refuses must not stop the pass: the other namespaces
    still get their grants and revocations, the policy drops the revoked robot, the
    statuses are written and the pass comes back soon (found by review: it raised, and
    every pass after it, so a revoked namespace kept a working credential)."""
    base = _kube()
    kube = _Webhooked()
    kube.objects, kube._versions = base.objects, base._versions
    kube.refuse = set()
    clock = Clock()
    _service_account(kube, "team-a", "builder", [])
    _repository(
        kube,
        "a",
        {
            "path": "team-a/api",
            "pullAccess": {"namespaces": ["team-a"], "serviceAccounts": ["builder"]},
        },
    )
    _run(kube, _options(clock))
    assert kube.objects[("ServiceAccount", "team-a", "builder")]["imagePullSecrets"] == [
        {"name": PULL}
    ]

    # Revoked (the Repository deleted) while the webhook refuses the account's change;
    # another Repository grants team-c meanwhile.
    kube.refuse = {("ServiceAccount", "team-a", "builder")}
    del kube.objects[("Repository", NS, "a")]
    _repository(kube, "c", {"path": "team-c/api", "pullAccess": {"namespaces": ["team-c"]}})
    clock.now += 60
    outcome = _run(kube, _options(clock))
    assert ("Secret", "team-a", PULL) not in kube.objects  # the credential is gone
    assert ("Secret", "team-c", PULL) in kube.objects
    assert [r["name"].rsplit(".", 1)[0] for r in _policy(kube)["robots"]] == ["pull.team-c"]
    assert _conditions(kube, "c")["Ready"] == ("True", "Granted")
    assert outcome.requeue_after == 10.0

    # A Secret whose delete is refused, and an account refused when granting: reported
    # on the Repository wanting it, the rest done.
    _service_account(kube, "team-b", "builder", [])
    kube.refuse = {("ServiceAccount", "team-b", "builder")}
    _repository(
        kube,
        "b",
        {
            "path": "team-b/api",
            "pullAccess": {"namespaces": ["team-b"], "serviceAccounts": ["builder"]},
        },
    )
    outcome = _run(kube, _options(clock))
    assert ("Secret", "team-b", PULL) in kube.objects
    ready = next(c for c in _status(kube, "b")["conditions"] if c["type"] == "Ready")
    assert "ServiceAccount team-b/builder not updated" in ready["message"], ready
    assert outcome.requeue_after == 10.0
    kube.refuse = {("Secret", "team-c", PULL)}
    del kube.objects[("Repository", NS, "c")]
    outcome = _run(kube, _options(clock))
    assert ("Secret", "team-c", PULL) in kube.objects  # refused: tried again in 10 s
    assert outcome.requeue_after == 10.0
    assert [r["name"].rsplit(".", 1)[0] for r in _policy(kube)["robots"]] == ["pull.team-b"]
    kube.refuse = set()
    _run(kube, _options(clock))
    assert ("Secret", "team-c", PULL) not in kube.objects


def test_deleting_the_repository_or_the_registry_revokes_everything() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "api", API)
    _run(kube, _options(clock))
    del kube.objects[("Repository", NS, "api")]
    _run(kube, _options(clock))
    assert kube.list("v1", "Secret", None, names.access_selector("main", NS)) == []
    assert "robots" not in _policy(kube)

    _repository(kube, "api", API)
    _run(kube, _options(clock))
    kube.objects[("Registry", NS, "main")]["metadata"]["deletionTimestamp"] = "now"
    _run(kube, _options(clock))
    assert kube.list("v1", "Secret", None, names.access_selector("main", NS)) == []
    assert _conditions(kube, "api")["Ready"] == ("False", "RegistryDeleting")


def test_conflicting_paths_are_reported_on_both() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "first", API, created="2026-01-01T00:00:00Z")
    _repository(
        kube,
        "second",
        {"path": "team-a/api", "pullAccess": {"namespaces": ["team-c"]}},
        created="2026-03-01T00:00:00Z",
    )
    outcome = _run(kube, _options(clock))
    assert _conditions(kube, "first")["PathConflict"] == ("True", "KeepsPath")
    assert _conditions(kube, "first")["Ready"] == ("True", "Granted")
    assert _conditions(kube, "second")["PathConflict"] == ("True", "PathHeldByOther")
    assert _conditions(kube, "second")["Ready"] == ("False", "PathConflict")
    assert ("Secret", "team-c", PULL) not in kube.objects
    warnings = {
        (ref["metadata"]["name"], e.reason) for ref, e in outcome.events if e.type == "Warning"
    }
    assert warnings == {("first", "PathConflict"), ("second", "PathConflict")}


def test_invalid_repository_and_missing_registry_are_reported() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "bad", {"path": "team-a/api", "rotation": {"interval": "soon"}})
    _run(kube, _options(clock))
    assert _conditions(kube, "bad")["Ready"] == ("False", "InvalidSpec")
    del kube.objects[("Registry", NS, "main")]
    _repository(kube, "api", API)
    _run(kube, _options(clock))
    assert _conditions(kube, "api")["Ready"] == ("False", "RegistryNotFound")
    assert kube.list("v1", "Secret", None, names.access_selector("main", NS)) == []


def test_rotation_never_hands_out_what_the_server_does_not_accept() -> None:
    kube, clock = _kube(), Clock()
    _repository(kube, "api", API)
    _run(kube, _options(clock))
    old = _dockerconfig(kube, "team-a")
    _repository(
        kube,
        "api",
        API,
        annotations={models.ROTATE_ANNOTATION: "now"},
        created="2026-01-01T00:00:00Z",
    )
    clock.now += 1
    outcome = _run(kube, _options(clock, access.REFUSED))
    # The request is taken: the annotation is gone, a new credential is in the policy...
    annotations = kube.objects[("Repository", NS, "api")]["metadata"]["annotations"]
    assert models.ROTATE_ANNOTATION not in annotations
    assert {"pull.team-a.1", "pull.team-a.2"} <= {r["name"] for r in _policy(kube)["robots"]}
    # ...but the Secret still holds the old one while the server refuses the new one.
    assert _dockerconfig(kube, "team-a") == old
    assert _conditions(kube, "api")["Rotating"] == ("True", "WaitingForServer")
    assert outcome.requeue_after is not None and outcome.requeue_after <= 15
    clock.now += 5
    _run(kube, _options(clock, access.REFUSED))
    assert _dockerconfig(kube, "team-a") == old

    clock.now += 5
    outcome = _run(kube, _options(clock, access.ACCEPTED))
    new = _dockerconfig(kube, "team-a")
    assert new["username"] == "pull.team-a.2" and new["password"] != old["password"]
    assert {"pull.team-a.1", "pull.team-a.2"} <= {r["name"] for r in _policy(kube)["robots"]}
    assert _conditions(kube, "api")["Rotating"] == ("True", "OldCredentialsValid")
    assert ("Rotated",) in {(e.reason,) for _, e in outcome.events}

    clock.now += 601
    _run(kube, _options(clock))
    assert {r["name"] for r in _policy(kube)["robots"]} == {"pull.team-a.2", "pull.team-b.2"}
    assert _conditions(kube, "api")["Rotating"] == ("False", "Idle")
    stored = kube.objects[("Secret", NS, "main-robots")]["data"]
    robot = robots.load("pull.team-a", base64.b64decode(stored["pull.team-a"]).decode())
    assert robot is not None and robot.current.name == "pull.team-a.2"


def test_consenting_peers_get_accounts_and_are_woken() -> None:
    kube, clock = _kube(), Clock()
    kube.objects[("Registry", NS, "main")]["spec"] = {
        "region": "eu",
        "replication": {
            "peers": [{"name": "us", "registryRef": {"name": "us", "namespace": "us"}}]
        },
    }
    kube.put(
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "Registry",
            "metadata": {"name": "us", "namespace": "us", "generation": 1},
            "spec": {
                "region": "us",
                "replication": {
                    "peers": [{"name": "eu", "registryRef": {"name": "main", "namespace": NS}}]
                },
            },
        }
    )
    outcome = _run(kube, _options(clock))
    assert outcome.wake == (("registry", "us", "us"),)
    policy = _policy(kube)
    assert "peer.us.us.1" in policy["admins"]
    assert [u["name"] for u in policy["users"]] == ["peer.us.us.1"]
    assert _run(kube, _options(clock)).wake == ()


def test_retry_soon_for_a_missing_service_account_rarely_for_a_foreign_secret() -> None:
    kube, clock = _kube(), Clock()
    _repository(
        kube, "api", {**API, "pullAccess": {"namespaces": ["team-a"], "serviceAccounts": ["ci"]}}
    )
    assert _run(kube, _options(clock)).requeue_after == 10.0
    _service_account(kube, "team-a", "ci", [])
    assert _run(kube, _options(clock)).requeue_after is None
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "theirs", "namespace": "team-c"},
            "type": "Opaque",
        }
    )
    _repository(
        kube,
        "other",
        {"path": "x/y", "pullAccess": {"namespaces": ["team-c"], "secretName": "theirs"}},
    )
    assert _run(kube, _options(clock)).requeue_after == 60.0


def test_a_refused_policy_is_reported_and_hands_out_nothing_it_does_not_hold() -> None:
    """The API server refuses the policy (too large, a quota, an admission webhook): the
    stored one stays in force. Repositories whose grants are in it stay Ready; a new one
    is told why it is not, its new robot's credential is not handed out, the Registry
    gets AccessApplied=False, and the pass is retried soon. Once accepted, all is well."""
    kube, clock = _kube(), Clock()
    _repository(kube, "api", API)
    first = _run(kube, _options(clock))
    assert first.applied is not None and first.applied.status == "True"
    main_before = kube.objects[("Secret", NS, "main-policy")]["data"]

    kube.reject["Secret/main-policy-0"] = 'Secret "main-policy-0" is invalid: data: Too long'
    _repository(kube, "web", {"path": "team-c/web", "pullAccess": {"namespaces": ["team-c"]}})
    refused = _run(kube, _options(clock))
    assert refused.applied is not None
    assert (refused.applied.status, refused.applied.reason) == ("False", "PolicyNotWritten")
    assert "Too long" in refused.applied.message
    assert kube.objects[("Secret", NS, "main-policy")]["data"] == main_before
    assert _conditions(kube, "api")["Ready"] == ("True", "Granted")
    assert _conditions(kube, "web")["Ready"] == ("False", "PolicyNotWritten")
    assert "Too long" in _status(kube, "web")["conditions"][0]["message"]
    assert ("Secret", "team-c", PULL) not in kube.objects  # its credential is not in force
    assert ("PolicyNotWritten", "web") in [
        (e.reason, ref["metadata"]["name"]) for ref, e in refused.events
    ]
    assert refused.requeue_after == 10.0

    del kube.reject["Secret/main-policy-0"]
    healed = _run(kube, _options(clock))
    assert healed.applied is not None and healed.applied.status == "True"
    assert _conditions(kube, "web")["Ready"] == ("True", "Granted")
    assert _dockerconfig(kube, "team-c")["username"] == "pull.team-c.1"


def test_a_refused_robots_secret_writes_no_policy() -> None:
    kube, clock = _kube(), Clock()
    kube.reject["Secret/main-robots"] = "exceeded quota"
    _repository(kube, "api", API)
    outcome = _run(kube, _options(clock))
    assert outcome.applied is not None and outcome.applied.status == "False"
    assert "main-robots" in outcome.applied.message
    assert ("Secret", NS, "main-policy") not in kube.objects
    assert ("Secret", "team-a", PULL) not in kube.objects
    assert _conditions(kube, "api")["Ready"] == ("False", "PolicyNotWritten")


def test_first_grants_in_bulk_are_told_once_on_the_registry() -> None:
    """More than BULK_GRANTS new Repositories in one pass: one Granted event on the
    Registry instead of one each (every Event is an API write); later changes are told
    on each Repository again."""
    kube, clock = _kube(), Clock()
    count = granting.BULK_GRANTS + 5
    for i in range(count):
        spec = {"path": f"team-a/svc-{i:03d}", "pullAccess": {"namespaces": ["team-a"]}}
        _repository(kube, f"svc-{i:03d}", spec)
    outcome = _run(kube, _options(clock))
    told = [(ref["kind"], ref["metadata"]["name"], e.reason) for ref, e in outcome.events]
    assert told == [("Registry", "main", "Granted")]
    (summary,) = [e for _, e in outcome.events]
    assert f"for {count} new Repositories: svc-000, svc-001" in summary.message
    for i in range(count):
        assert _conditions(kube, f"svc-{i:03d}")["Ready"] == ("True", "Granted")
    moved = kube.objects[("Repository", NS, "svc-000")]
    moved["spec"]["pullAccess"] = {"namespaces": ["team-b"]}
    moved["metadata"]["generation"] = 2
    again = _run(kube, _options(clock))
    assert sorted((ref["metadata"]["name"], e.reason) for ref, e in again.events) == [
        ("svc-000", "Granted"),
        ("svc-000", "Revoked"),
    ]


def test_the_paths_listed_on_a_secret_stay_small_however_many_grant_it() -> None:
    """Thousands of Repositories granting one namespace must not make its Secret's
    annotations too large to write (256 KiB in all; found by review)."""
    assert grants.listing(("team-a/api", "team-a/web")) == "team-a/api,team-a/web"
    paths = tuple(f"team-{i:05d}/service-with-a-long-name" for i in range(8000))
    listed = grants.listing(paths)
    assert len(listed) <= grants.LISTING_LIMIT
    shown = listed.split(",")[:-1]
    assert shown == list(paths[: len(shown)])
    assert listed.endswith(f",... and {len(paths) - len(shown)} more")


def test_a_policy_growing_past_the_mounted_slots_wakes_the_registry() -> None:
    """The pods mount a fixed number of shard Secrets; when the policy needs more, the
    Registry's reconcile must render the Deployment mounting them at once, not at the
    next resync (found by review: the access pass's writes wake nothing)."""
    kube, clock = _kube(), Clock()
    for i in range(80):
        kube.namespace(f"tenant-{i}", {})
        _repository(
            kube,
            f"r{i}",
            {"path": f"tenant-{i}/app", "pullAccess": {"namespaces": [f"tenant-{i}"]}},
        )
    options = dataclasses.replace(_options(clock), policy_shard_bytes=400)
    first = _run(kube, options)
    shards = int(
        kube.objects[("Secret", NS, "main-policy")]["metadata"]["annotations"][
            names.POLICY_SHARDS_ANNOTATION
        ]
    )
    assert shards > names.POLICY_SHARD_SLOTS
    assert ("registry", NS, "main") in first.wake
    assert ("registry", NS, "main") not in _run(kube, options).wake  # mounted by then


def test_a_tampered_service_account_annotation_stops_nothing() -> None:
    """The annotation on a pull Secret is the namespace's to edit: a name there that no
    API path takes must not fail the pass (found by review: revocation and every other
    namespace's grants stopped, and the revoked credential kept working)."""
    kube, clock = _kube(), Clock()
    _repository(kube, "a", {"path": "team-a/api", "pullAccess": {"namespaces": ["team-a"]}})
    _run(kube, _options(clock))
    secret = kube.objects[("Secret", "team-a", PULL)]
    secret["metadata"].setdefault("annotations", {})[names.SERVICE_ACCOUNTS_ANNOTATION] = (
        "x/y,../../namespaces/kube-system/secrets/z"
    )
    del kube.objects[("Repository", NS, "a")]
    _repository(kube, "c", {"path": "team-c/api", "pullAccess": {"namespaces": ["team-c"]}})
    _run(kube, _options(clock))
    assert ("Secret", "team-a", PULL) not in kube.objects
    assert ("Secret", "team-c", PULL) in kube.objects
    assert [r["name"].rsplit(".", 1)[0] for r in _policy(kube)["robots"]] == ["pull.team-c"]
