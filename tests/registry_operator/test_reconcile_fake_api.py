"""reconcile() against an in-memory stand-in for the API server (fast, no processes).

The integration tests run the same code against a real kube-apiserver; these pin down
the decisions: what is applied, which events are told, what the status says.
"""

from __future__ import annotations

import base64
import datetime
import itertools
from typing import Any

import pytest

from registry_operator import credentials, peering, reconcile, status
from registry_operator.kube import errors
from tests.registry_operator.fake_kube import FakeKube


def _registry(kube: FakeKube, spec: dict[str, Any], generation: int = 1) -> None:
    key = ("Registry", "ns", "main")
    existing = kube.objects.get(key)
    body: dict[str, Any] = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": "main", "namespace": "ns", "uid": "reg-uid", "generation": generation},
        "spec": spec,
    }
    if existing is not None and "status" in existing:
        body["status"] = existing["status"]
    kube.put(body)


NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


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
        moment=lambda: NOW,
    )


def _run(kube: FakeKube) -> reconcile.Outcome:
    return reconcile.reconcile(kube, "ns", "main", _options())  # type: ignore[arg-type]


def _reasons(outcome: reconcile.Outcome) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in outcome.events]


def _conditions(kube: FakeKube) -> dict[str, tuple[str, str]]:
    registry = kube.objects[("Registry", "ns", "main")]
    return {c["type"]: (c["status"], c["reason"]) for c in registry["status"]["conditions"]}


def test_create_then_nothing_to_do() -> None:
    kube = FakeKube()
    _registry(kube, {})
    outcome = _run(kube)
    assert outcome.failure is None
    assert _reasons(outcome) == [
        (
            "CertificateIssued",
            "issued the serving certificate in Secret main-serving-tls, valid until "
            "2026-04-01T00:00:00Z",
        ),
        (
            "CredentialsGenerated",
            "generated token.key, admin-password, htpasswd:admin, replication-password, "
            "htpasswd:replicator in Secret main-auth",
        ),
        ("Created", "created Secret main-serving-ca"),
        ("Created", "created Secret main-serving-tls"),
        ("Created", "created ConfigMap main-config"),
        ("Created", "created Secret main-auth"),
        ("Created", "created PersistentVolumeClaim main-data"),
        ("Created", "created Deployment main"),
        ("Created", "created Service main"),
        ("Created", "created DaemonSet main-node-proxy"),
        (
            "Published",
            "ConfigMap kube-public/local-registry-hosting names this Registry (localhost:5871)",
        ),
    ]
    assert _conditions(kube) == {
        "Ready": ("False", "RollingOut"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
        "StorageReady": ("False", "Pending"),
        "CertificateReady": ("True", "Valid"),
    }
    assert kube.objects[("Registry", "ns", "main")]["status"]["tls"] == {
        "mode": "Generated",
        "secretName": "main-serving-tls",
        "notAfter": "2026-04-01T00:00:00Z",
    }
    secret = kube.find("v1", "Secret", "ns", "main-auth")
    versions = {k: o["metadata"]["resourceVersion"] for k, o in kube.objects.items()}

    again = _run(kube)
    assert again.events == ()
    assert kube.find("v1", "Secret", "ns", "main-auth") == secret
    assert {k: o["metadata"]["resourceVersion"] for k, o in kube.objects.items()} == versions


def test_deployment_becoming_available_is_reported_once() -> None:
    kube = FakeKube()
    _registry(kube, {})
    _run(kube)
    deployment = kube.objects[("Deployment", "ns", "main")]
    deployment["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
        "readyReplicas": 1,
    }
    kube.objects[("PersistentVolumeClaim", "ns", "main-data")]["status"] = {"phase": "Bound"}
    assert _reasons(_run(kube)) == [("Ready", "1/1 replicas available")]
    assert _conditions(kube)["Ready"] == ("True", "Available")
    assert _conditions(kube)["StorageReady"] == ("True", "Bound")
    assert kube.objects[("Registry", "ns", "main")]["status"]["readyReplicas"] == 1
    assert _run(kube).events == ()


def test_drift_is_repaired_and_told() -> None:
    kube = FakeKube()
    _registry(kube, {})
    _run(kube)
    kube.delete("v1", "Service", "ns", "main")
    kube.objects[("Deployment", "ns", "main")]["spec"]["replicas"] = 7
    outcome = _run(kube)
    assert _reasons(outcome) == [
        ("Repaired", "reverted changes made to Deployment main"),
        ("Restored", "recreated Service main, which was deleted"),
    ]
    assert kube.objects[("Deployment", "ns", "main")]["spec"]["replicas"] == 1


def test_an_edit_landing_between_read_and_apply_is_still_told() -> None:
    """A watch event often starts a reconcile just before a hand edit lands: the edit is
    reverted by an apply whose read predates it, and must still be reported."""

    class EditDuringApply(FakeKube):
        armed = False

        def apply(self, manifest: Any, subresource: str | None = None) -> dict[str, Any]:
            if self.armed and manifest["kind"] == "Deployment" and subresource is None:
                current = self.objects[("Deployment", "ns", "main")]
                current["spec"]["replicas"] = 7
                current["metadata"]["generation"] += 1
            return super().apply(manifest, subresource)

    kube = EditDuringApply()
    _registry(kube, {})
    _run(kube)
    kube.objects[("Deployment", "ns", "main")]["metadata"]["generation"] = 1
    kube.armed = True
    assert _reasons(_run(kube)) == [("Repaired", "reverted changes made to Deployment main")]
    assert kube.objects[("Deployment", "ns", "main")]["spec"]["replicas"] == 1
    assert kube.objects[("Deployment", "ns", "main")]["metadata"]["generation"] == 3


def test_a_deletion_landing_between_read_and_apply_is_still_told() -> None:
    class DeleteDuringApply(FakeKube):
        armed = False

        def apply(self, manifest: Any, subresource: str | None = None) -> dict[str, Any]:
            if self.armed and manifest["kind"] == "Service":
                self.delete("v1", "Service", "ns", "main")
                self.armed = False
            return super().apply(manifest, subresource)

    kube = DeleteDuringApply()
    _registry(kube, {})
    _run(kube)
    kube.objects[("Service", "ns", "main")]["metadata"]["uid"] = "first-service"
    kube.armed = True
    assert _reasons(_run(kube)) == [("Restored", "recreated Service main, which was deleted")]
    assert kube.objects[("Service", "ns", "main")]["metadata"]["uid"] != "first-service"


def test_events_made_before_a_failure_are_handed_out() -> None:
    class ServiceDown(FakeKube):
        armed = False

        def apply(self, manifest: Any, subresource: str | None = None) -> dict[str, Any]:
            if self.armed and manifest["kind"] == "Service":
                raise errors.Retryable("the API server is busy", 429)
            return super().apply(manifest, subresource)

    kube = ServiceDown()
    _registry(kube, {})
    _run(kube)
    kube.delete("v1", "ConfigMap", "ns", "main-config")
    kube.armed = True
    told = reconcile.Told()
    with pytest.raises(errors.Retryable):
        reconcile.reconcile(kube, "ns", "main", _options(), told=told)  # type: ignore[arg-type]
    assert told.ref is not None and told.ref["metadata"]["uid"] == "reg-uid"
    assert [(e.reason, e.message) for e in told.events] == [
        ("Restored", "recreated ConfigMap main-config, which was deleted")
    ]


def test_spec_change_updates_children_and_keeps_credentials() -> None:
    kube = FakeKube()
    _registry(kube, {})
    _run(kube)
    secret = kube.find("v1", "Secret", "ns", "main-auth")
    old = kube.objects[("Deployment", "ns", "main")]["spec"]["template"]["metadata"]["annotations"]
    _registry(kube, {"logLevel": "debug", "replicas": 0}, generation=2)
    outcome = _run(kube)
    assert _reasons(outcome) == [
        ("Updated", "updated ConfigMap main-config"),
        ("Updated", "updated Deployment main"),
    ]
    assert kube.find("v1", "Secret", "ns", "main-auth") == secret
    new = kube.objects[("Deployment", "ns", "main")]["spec"]["template"]["metadata"]["annotations"]
    assert new != old
    assert kube.objects[("Registry", "ns", "main")]["status"]["observedGeneration"] == 2


def test_deleted_secret_means_new_credentials() -> None:
    kube = FakeKube()
    _registry(kube, {})
    _run(kube)
    old = kube.find("v1", "Secret", "ns", "main-auth")
    kube.delete("v1", "Secret", "ns", "main-auth")
    outcome = _run(kube)
    assert outcome.events[0].reason == "CredentialsGenerated"
    assert kube.find("v1", "Secret", "ns", "main-auth") != old


def test_invalid_spec_is_reported_once_and_not_applied() -> None:
    kube = FakeKube()
    _registry(kube, {"replicas": 3})  # SQLite: the CRD's CEL rule would refuse it
    outcome = _run(kube)
    assert outcome.failure is not None
    assert outcome.failure.reason == "InvalidSpec"
    assert kube.applied == []
    assert _reasons(outcome) == [
        (
            "InvalidSpec",
            "spec.replicas: replicas > 1 requires storage.s3 and metadata.postgresql "
            "(SQLite serves one pod only)",
        )
    ]
    assert [e.type for e in outcome.events] == ["Warning"]
    assert _conditions(kube)["Degraded"] == ("True", "InvalidSpec")
    assert _run(kube).events == ()

    _registry(kube, {"replicas": 1}, generation=2)
    fixed = _run(kube)
    assert fixed.failure is None
    assert ("Recovered", "no longer degraded (InvalidSpec)") in _reasons(fixed)


def test_a_refused_child_does_not_stop_the_others() -> None:
    kube = FakeKube()
    _registry(kube, {})
    kube.reject["PersistentVolumeClaim"] = "spec: Forbidden: field is immutable"
    outcome = _run(kube)
    assert outcome.failure is not None
    assert outcome.failure.message == (
        "PersistentVolumeClaim main-data: spec: Forbidden: field is immutable"
    )
    assert "Deployment/main" in kube.applied
    assert "Service/main" in kube.applied
    assert _conditions(kube)["Degraded"] == ("True", "ApplyRejected")
    assert ("Warning", "ApplyRejected") in [(e.type, e.reason) for e in outcome.events]


def test_ingress_follows_the_spec() -> None:
    kube = FakeKube()
    _registry(kube, {"ingress": {"host": "r.example.com"}})
    _run(kube)
    assert kube.find("networking.k8s.io/v1", "Ingress", "ns", "main") is not None
    _registry(kube, {}, generation=2)
    outcome = _run(kube)
    assert ("Deleted", "deleted Ingress main") in _reasons(outcome)
    assert kube.find("networking.k8s.io/v1", "Ingress", "ns", "main") is None


def test_foreign_ingress_with_the_same_name_is_left_alone() -> None:
    kube = FakeKube()
    _registry(kube, {})
    kube.put(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": "main", "namespace": "ns", "labels": {"app": "other"}},
        }
    )
    _run(kube)
    assert kube.find("networking.k8s.io/v1", "Ingress", "ns", "main") is not None


@pytest.mark.parametrize("deleting", [False, True])
def test_gone_or_going(deleting: bool) -> None:
    kube = FakeKube()
    if deleting:
        _registry(kube, {})
        kube.objects[("Registry", "ns", "main")]["metadata"]["deletionTimestamp"] = "now"
    outcome = _run(kube)
    assert kube.applied == []
    assert outcome.events == ()
    assert (outcome.ref is not None) == deleting


SCALE_OUT = {
    "replicas": 3,
    "storage": {"s3": {"bucket": "images", "credentialsSecretRef": {"name": "s3-keys"}}},
    "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}},
}


def _user_secret(kube: FakeKube, name: str, **data: str) -> None:
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": "ns"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
    )


def _checksum(kube: FakeKube) -> str:
    deployment = kube.objects[("Deployment", "ns", "main")]
    return str(
        deployment["spec"]["template"]["metadata"]["annotations"]["berth.dev/config-checksum"]
    )


def test_scale_out_back_ends_missing_secrets_are_named_then_rotation_rolls_the_pods() -> None:
    kube = FakeKube()
    _registry(kube, SCALE_OUT)
    _run(kube)
    # Applied anyway (the pods wait for their volumes), and the status says what is missing.
    assert kube.objects[("Deployment", "ns", "main")]["spec"]["replicas"] == 3
    assert _conditions(kube)["StorageReady"] == ("False", "SecretMissing")
    message = next(
        c["message"]
        for c in kube.objects[("Registry", "ns", "main")]["status"]["conditions"]
        if c["type"] == "StorageReady"
    )
    assert "Secret s3-keys (spec.storage.s3.credentialsSecretRef) does not exist" in message
    assert "Secret db (spec.metadata.postgresql.connectionSecretRef) does not exist" in message

    _user_secret(kube, "s3-keys", accessKeyID="AK", secretAccessKey="SK")
    _user_secret(kube, "db", dsn="postgresql://db/berth")
    _run(kube)
    assert _conditions(kube)["StorageReady"] == ("Unknown", "Checking")
    before = _checksum(kube)
    ready = reconcile.reconcile(
        kube,  # type: ignore[arg-type]
        "ns",
        "main",
        _options(),
        readiness=status.Readiness(200, "ok"),
    )
    assert ready.new_status is not None
    assert _conditions(kube)["StorageReady"] == ("True", "Connected")
    assert _checksum(kube) == before  # a status change only

    _user_secret(kube, "s3-keys", accessKeyID="AK", secretAccessKey="rotated")
    _run(kube)
    assert _checksum(kube) != before  # the server reads the keys once: roll the pods


def test_a_full_volume_is_told_once_and_its_end_too() -> None:
    kube = FakeKube()
    _registry(kube, {})
    _run(kube)
    kube.objects[("PersistentVolumeClaim", "ns", "main-data")]["status"] = {"phase": "Bound"}
    full = status.Readiness(503, "storage full: 10.0 MiB free of 10.0 GiB (100% used) on x")

    def run(readiness: status.Readiness | None) -> reconcile.Outcome:
        return reconcile.reconcile(
            kube,  # type: ignore[arg-type]
            "ns",
            "main",
            _options(),
            readiness=readiness,
        )

    assert [e.reason for e in run(None).events if e.reason.startswith("Storage")] == []
    told = run(full)
    assert [(e.type, e.reason, e.message) for e in told.events] == [
        ("Warning", "StorageFull", full.text)
    ]
    assert _conditions(kube)["StorageReady"] == ("False", "StorageFull")
    assert [e.reason for e in run(full).events] == []  # still full: nothing new to tell
    recovered = run(None)
    assert [(e.type, e.reason) for e in recovered.events] == [("Normal", "StorageRecovered")]
    assert _conditions(kube)["StorageReady"] == ("True", "Bound")


def test_a_spec_change_finds_the_peers_to_tell_in_the_index_without_listing() -> None:
    """The operator hands the reconcile its index of every Registry's peers: a spec
    change no longer lists every Registry of the cluster (megabytes at a thousand)."""
    peer = {"name": "to-eu", "registryRef": {"name": "eu"}}
    kube = FakeKube()
    _registry(kube, {"region": "us", "replication": {"peers": [peer]}})
    eu = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": "eu", "namespace": "ns", "uid": "eu-uid", "generation": 1},
        "spec": {"region": "eu", "replication": {"peers": [{"registryRef": {"name": "main"}}]}},
    }
    kube.put(eu)
    listed = FakeKube.list

    def no_registry_list(
        self: FakeKube, api_version: str, kind: str, *args: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        assert kind != "Registry", "listed every Registry"
        return listed(self, api_version, kind, *args, **kwargs)

    stubs = [peering.peers_stub(body) for body in kube.list("", "Registry", None)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeKube, "list", no_registry_list)
        outcome = reconcile.reconcile(
            kube,  # type: ignore[arg-type]
            "ns",
            "main",
            _options(),
            claims=[],
            peer_lists=stubs,
        )
    assert ("registry", "ns", "eu") in outcome.wake and ("access", "ns", "eu") in outcome.wake
    # Without the index (None), the same answer from a list.
    _registry(kube, {"region": "us", "replication": {"peers": [peer]}}, generation=2)
    again = reconcile.reconcile(kube, "ns", "main", _options(), claims=[])  # type: ignore[arg-type]
    assert ("registry", "ns", "eu") in again.wake and ("access", "ns", "eu") in again.wake
