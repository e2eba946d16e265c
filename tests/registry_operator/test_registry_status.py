"""Status conditions derived from the Deployment and the claim (table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from registry_operator import models, status


def _deployment(
    *,
    replicas: int = 1,
    generation: int = 1,
    observed: int = 1,
    updated: int = 1,
    available: int = 1,
    total: int | None = None,
    progressing: tuple[str, str] | None = ("True", "NewReplicaSetAvailable"),
    replica_failure: bool = False,
) -> dict[str, Any]:
    conditions = []
    if progressing is not None:
        conditions.append(
            {
                "type": "Progressing",
                "status": progressing[0],
                "reason": progressing[1],
                "message": "m",
            }
        )
    if replica_failure:
        conditions.append(
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": "quota",
            }
        )
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": updated if total is None else total,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "readyReplicas": available,
            "conditions": conditions,
        },
    }


def _summary(deployment: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.deployment_conditions(deployment)}


@pytest.mark.parametrize(
    ("deployment", "ready", "progressing", "degraded"),
    [
        (None, ("False", "DeploymentMissing"), ("True", "Creating"), ("False", "AsExpected")),
        (
            _deployment(),
            ("True", "Available"),
            ("False", "RolloutComplete"),
            ("False", "AsExpected"),
        ),
        # Just created: the controller has not looked at it yet.
        (
            _deployment(observed=0, updated=0, available=0, progressing=None),
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("False", "AsExpected"),
        ),
        # New pods created, not available yet.
        (
            _deployment(available=0, progressing=("True", "ReplicaSetUpdated")),
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("False", "AsExpected"),
        ),
        # A rolling update: old pods still there.
        (
            _deployment(replicas=2, updated=1, available=2, total=3),
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("False", "AsExpected"),
        ),
        # A spec change not yet observed by the Deployment controller.
        (
            _deployment(generation=2, observed=1),
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("False", "AsExpected"),
        ),
        # Rolled out, then a pod stopped being ready.
        (
            _deployment(replicas=2, updated=2, available=1),
            ("False", "Unavailable"),
            ("False", "RolloutComplete"),
            ("True", "Unavailable"),
        ),
        (
            _deployment(available=0, progressing=("False", "ProgressDeadlineExceeded")),
            ("False", "ProgressDeadlineExceeded"),
            ("False", "ProgressDeadlineExceeded"),
            ("True", "ProgressDeadlineExceeded"),
        ),
        (
            _deployment(available=0, updated=0, replica_failure=True, progressing=None),
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("True", "ReplicaFailure"),
        ),
        (
            _deployment(replicas=0, updated=0, available=0),
            ("False", "ScaledToZero"),
            ("False", "RolloutComplete"),
            ("False", "AsExpected"),
        ),
    ],
)
def test_deployment_conditions(
    deployment: dict[str, Any] | None,
    ready: tuple[str, str],
    progressing: tuple[str, str],
    degraded: tuple[str, str],
) -> None:
    assert _summary(deployment) == {
        "Ready": ready,
        "Progressing": progressing,
        "Degraded": degraded,
    }


@pytest.mark.parametrize(
    ("storage", "pvc", "expected"),
    [
        (models.PvcStorage(), None, ("False", "NotFound")),
        (models.PvcStorage(), {"status": {"phase": "Pending"}}, ("False", "Pending")),
        (models.PvcStorage(), {"status": {}}, ("False", "Pending")),
        (models.PvcStorage(), {"status": {"phase": "Bound"}}, ("True", "Bound")),
        (models.PvcStorage(), {"status": {"phase": "Lost"}}, ("False", "Lost")),
        (models.EmptyDirStorage(), None, ("True", "EmptyDir")),
        (None, None, ("Unknown", "InvalidSpec")),
    ],
)
def test_storage_condition(
    storage: models.Storage | None, pvc: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    spec = None if storage is None else models.Spec(image="img", storage=storage)
    condition = status.storage_condition(spec, pvc)
    assert (condition.status, condition.reason) == expected


S3_PG = models.Spec(
    image="img",
    replicas=3,
    storage=models.S3Storage("images", "s3-keys"),
    postgresql=models.PostgresMetadata(models.KeyRef("db", "dsn")),
)
PVC_PG = models.Spec(image="img", postgresql=S3_PG.postgresql)
BOUND = {"status": {"phase": "Bound"}}
FULL = status.Readiness(
    503, "storage full: 1.2 MiB free of 48.0 MiB (98% used) on the registry's volume"
)


@pytest.mark.parametrize(
    ("spec", "pvc", "backends", "ready", "expected"),
    [
        # Nothing heard yet.
        (S3_PG, None, status.Backends(), 0, ("Unknown", "Checking")),
        (S3_PG, None, status.Backends(("Secret db (...) does not exist",)), 3,
         ("False", "SecretMissing")),
        (S3_PG, None, status.Backends(readiness=status.Readiness(200, "ok")), 3,
         ("True", "Connected")),
        (S3_PG, None,
         status.Backends(readiness=status.Readiness(503, "index unavailable: OperationalError")),
         1, ("False", "BackendUnavailable")),
        # Nothing answered and no pod is ready: the readiness probe is what fails.
        (S3_PG, None, status.Backends(readiness=status.Readiness(None, "refused")), 0,
         ("False", "NoReadyReplica")),
        (S3_PG, None, status.Backends(readiness=status.Readiness(None, "refused")), 2,
         ("Unknown", "Checking")),
        # A volume and a database: the volume first, then the database.
        (PVC_PG, {"status": {"phase": "Pending"}}, status.Backends(), 0, ("False", "Pending")),
        (PVC_PG, BOUND, status.Backends(readiness=status.Readiness(200, "ok")), 1,
         ("True", "Connected")),
        # A full volume, on a claim with SQLite (nothing external) or with PostgreSQL.
        (models.Spec(image="img"), BOUND, status.Backends(readiness=FULL, external=False), 1,
         ("False", "StorageFull")),
        (PVC_PG, BOUND, status.Backends(readiness=FULL), 1, ("False", "StorageFull")),
        (models.Spec(image="img"), BOUND, status.Backends(external=False), 1, ("True", "Bound")),
        # An upstream's CA bundle missing keeps the pods from starting: said, on a volume too.
        (models.Spec(image="img"), BOUND,
         status.Backends(("ConfigMap corp-ca (...) does not exist",), external=False), 0,
         ("False", "SecretMissing")),
        # Without back ends of its own, a server that does not answer says nothing of them.
        (models.Spec(image="img"), BOUND,
         status.Backends(readiness=status.Readiness(None, "refused"), external=False), 0,
         ("True", "Bound")),
    ],
)  # fmt: skip
def test_storage_condition_with_external_back_ends(
    spec: models.Spec,
    pvc: dict[str, Any] | None,
    backends: status.Backends,
    ready: int,
    expected: tuple[str, str],
) -> None:
    condition = status.storage_condition(spec, pvc, backends, ready)
    assert (condition.status, condition.reason) == expected
    if expected[1] == "StorageFull":
        assert condition.message == FULL.text  # the usage, as the server gives it
    if expected[1] == "Connected" and spec is PVC_PG:
        assert "PersistentVolumeClaim is bound" in condition.message


OWNER = models.Owner("main", "ns", "uid")
SPEC = models.parse_spec({}, image="img")


def test_build_status_and_transition_times() -> None:
    observed = status.Observed(deployment=_deployment(), pvc={"status": {"phase": "Bound"}})
    first = status.build(OWNER, 4, SPEC, observed, {}, "2026-01-01T00:00:00Z")
    assert first["observedGeneration"] == 4
    assert first["endpoint"] == "https://main.ns.svc:5000"
    assert first["readyReplicas"] == 1
    assert "externalEndpoint" not in first
    assert [c["type"] for c in first["conditions"]] == [
        "Ready",
        "Progressing",
        "Degraded",
        "StorageReady",
    ]
    assert all(c["observedGeneration"] == 4 for c in first["conditions"])
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:00Z" for c in first["conditions"])

    # Same statuses later: times are kept. Ready flips: only its time moves.
    later = status.build(OWNER, 4, SPEC, observed, first, "2026-01-02T00:00:00Z")
    assert later == first
    degraded = status.Observed(deployment=_deployment(available=0), pvc=observed.pvc)
    flipped = status.build(OWNER, 5, SPEC, degraded, first, "2026-01-03T00:00:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {
        "Ready": "2026-01-03T00:00:00Z",
        "Progressing": "2026-01-01T00:00:00Z",
        "Degraded": "2026-01-03T00:00:00Z",
        "StorageReady": "2026-01-01T00:00:00Z",
    }


def test_failure_overrides_progress_and_degraded() -> None:
    failure = status.Failure("InvalidSpec", "spec.replicas: nope")
    built = status.build(OWNER, 2, None, status.Observed(), {}, "t", failure)
    summary = {c["type"]: (c["status"], c["reason"], c["message"]) for c in built["conditions"]}
    assert summary == {
        "Ready": ("False", "InvalidSpec", "spec.replicas: nope"),
        "Progressing": ("False", "InvalidSpec", "spec.replicas: nope"),
        "Degraded": ("True", "InvalidSpec", "spec.replicas: nope"),
        "StorageReady": ("Unknown", "InvalidSpec", "the storage spec is invalid"),
    }
    # A serving Deployment stays Ready while a later spec is refused.
    serving = status.Observed(deployment=_deployment())
    kept = status.build(OWNER, 2, SPEC, serving, {}, "t", failure)
    assert kept["conditions"][0]["status"] == "True"


def test_external_endpoint_with_ingress() -> None:
    spec = models.parse_spec({"ingress": {"host": "r.example.com"}}, image="img")
    built = status.build(OWNER, 1, spec, status.Observed(), {}, "t")
    assert built["externalEndpoint"] == "http://r.example.com"


# --- replication ----------------------------------------------------------------------------

PEERS = [status.PeerState("us", "http://us.us.svc:5000"), status.PeerState("ap", "https://ap")]


def _report(**us: Any) -> status.ReplicationObservation:
    base = {"name": "us", "queue_depth": 0, "lag_seconds": 0.0, "delivered": 3}
    return status.ReplicationObservation(
        payload={"region": "eu", "peers": [{**base, **us}, {"name": "ap", "delivered": 1}]}
    )


@pytest.mark.parametrize(
    ("peers", "observation", "condition"),
    [
        (PEERS, None, ("Unknown", "StatusPending")),
        (PEERS, status.ReplicationObservation(error="refused"), ("Unknown", "StatusUnavailable")),
        (PEERS, _report(), ("True", "Replicating")),
        (PEERS, _report(lag_seconds=61.0, queue_depth=4), ("False", "Lagging")),
        (PEERS, _report(last_error="boom", last_error_at=20.0), ("False", "PeerErrors")),
        (
            PEERS,
            _report(last_error="old", last_error_at=20.0, last_success=30.0),
            ("True", "Replicating"),
        ),
        (
            [status.PeerState("us", "u", "NotMutual", "us does not list this one"), PEERS[1]],
            _report(),
            ("False", "NotMutual"),
        ),
    ],
)
def test_replication_healthy(
    peers: list[status.PeerState],
    observation: status.ReplicationObservation | None,
    condition: tuple[str, str],
) -> None:
    _, found = status.replication_status("eu", peers, observation)
    assert (found.status, found.reason) == condition


def test_replication_summary_per_peer() -> None:
    summary, _ = status.replication_status(
        "eu", PEERS, _report(lag_seconds=1.23456, queue_depth=2, last_success=1_800_000_000)
    )
    assert summary == {
        "region": "eu",
        "peers": [
            {
                "name": "us",
                "url": "http://us.us.svc:5000",
                "wired": True,
                "queueDepth": 2,
                "lagSeconds": 1.235,
                "delivered": 3,
                "antiEntropyRepaired": 0,
                "lastSuccessTime": "2027-01-15T08:00:00Z",
            },
            {
                "name": "ap",
                "url": "https://ap",
                "wired": True,
                "queueDepth": 0,
                "lagSeconds": 0.0,
                "delivered": 1,
                "antiEntropyRepaired": 0,
            },
        ],
    }


def test_no_peers_no_replication_status() -> None:
    owner = models.Owner("main", "ns", "u")
    spec = models.parse_spec({})
    built = status.build(owner, 1, spec, status.Observed(), {}, "2026-01-01T00:00:00Z")
    assert "replication" not in built
    assert "ReplicationHealthy" not in {c["type"] for c in built["conditions"]}
