"""Derive a Registry's status from what its children report. Pure: no I/O here.

Conditions follow the Kubernetes API conventions: `type`, `status` ("True", "False",
"Unknown"), a CamelCase `reason`, a human `message`, `lastTransitionTime` (changed only
when `status` flips) and the `observedGeneration` they were computed for. The helpers
for conditions and timestamps serve the Repositories' statuses too (`access`, `granting`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from registry_operator import models
from registry_operator.rendering import names

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
STORAGE_READY = "StorageReady"
REPLICATION_HEALTHY = "ReplicationHealthy"
ACCESS_APPLIED = "AccessApplied"  # written from the access reconcile's finding
# A peer whose oldest undelivered change is older than this is lagging.
LAG_THRESHOLD_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why the last reconcile could not do its job (shown as Degraded)."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the API server reported about the children, as raw objects (None = absent)."""

    deployment: Mapping[str, Any] | None = None
    pvc: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Readiness:
    """The last answer of the server's GET /readyz/writes (the index, the blob store, and
    whether the volume is full): `code` None when nothing answered."""

    code: int | None
    text: str

    @property
    def storage_full(self) -> bool:
        return self.code == 503 and self.text.startswith(STORAGE_FULL_TEXT)


# How the server's /readyz/writes begins its answer while writes are refused.
STORAGE_FULL_TEXT = "storage full"
STORAGE_FULL = "StorageFull"


@dataclasses.dataclass(frozen=True)
class Backends:
    """What StorageReady knows beyond the claim: the external back ends' Secrets
    (`backends.check`), whether the Registry has any, and the server's last answer."""

    problems: tuple[str, ...] = ()
    readiness: Readiness | None = None
    external: bool = True  # S3 or PostgreSQL; False: only a full volume is reported


@dataclasses.dataclass(frozen=True)
class PeerState:
    """How the operator wired one peer; `reason` is empty when it is in the config."""

    name: str
    url: str
    reason: str = ""
    message: str = ""


@dataclasses.dataclass(frozen=True)
class ReplicationObservation:
    """The last answer of the server's GET /berth/v1/replication/status, or why none came."""

    payload: Mapping[str, Any] | None = None
    error: str | None = None


def rfc3339(timestamp: float) -> str:
    """Seconds since the epoch as the API's timestamps write them: whole seconds, UTC."""
    moment = datetime.datetime.fromtimestamp(math.floor(timestamp), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def condition_of(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    """The condition of that type in a `.status` as the API holds it; {} when absent."""
    for found in status.get("conditions") or []:
        if found.get("type") == type_:
            return dict(found)
    return {}


def _canonical(fields: Mapping[str, Any]) -> str:
    """JSON with sorted keys: equal for equal values, lists and tuples alike (the encoder
    is C, and this runs for every Repository on every access pass)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def essence(status: Mapping[str, Any]) -> int:
    """A digest of what a `.status` says, without the conditions' lastTransitionTime:
    two statuses with the same essence need no write. Kept instead of the status itself
    for thousands of Repositories (an int, not a tree of dicts)."""
    conditions = tuple(
        sorted(
            (
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                c.get("message") or "",
                c.get("observedGeneration"),
            )
            for c in status.get("conditions") or []
            if isinstance(c, Mapping)
        )
    )
    fields = _canonical({k: v for k, v in status.items() if k != "conditions"})
    return hash((fields, conditions))


def essence_of(fields: Mapping[str, Any], found: Sequence[Condition], generation: int) -> int:
    """The essence of the status `fields` and `found` would render to (see essence),
    without rendering it: asked of every Repository on every pass."""
    conditions = tuple(sorted((c.type, c.status, c.reason, c.message, generation) for c in found))
    return hash((_canonical({**fields, "observedGeneration": generation}), conditions))


def differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two conditions say something different (an event tells it again)."""
    return any(old.get(key) != new.get(key) for key in ("status", "reason", "message"))


def _time(value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return rfc3339(value)


def replication_status(
    region: str | None,
    peers: Sequence[PeerState],
    observation: ReplicationObservation | None,
) -> tuple[dict[str, Any], Condition]:
    """`.status.replication` and the ReplicationHealthy condition."""
    reported: dict[str, Mapping[str, Any]] = {}
    payload = observation.payload if observation is not None else None
    for item in (payload or {}).get("peers") or []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            reported[item["name"]] = item
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    lagging: list[str] = []
    for peer in peers:
        row: dict[str, Any] = {"name": peer.name, "url": peer.url, "wired": not peer.reason}
        if peer.reason:
            row["reason"] = peer.reason
            row["message"] = peer.message
        found = reported.get(peer.name)
        if found is not None:
            lag = float(found.get("lag_seconds") or 0.0)
            row.update(
                {
                    "queueDepth": int(found.get("queue_depth") or 0),
                    "lagSeconds": round(lag, 3),
                    "delivered": int(found.get("delivered") or 0),
                    "antiEntropyRepaired": int(found.get("anti_entropy_repaired") or 0),
                }
            )
            for key, field in (
                ("last_success", "lastSuccessTime"),
                ("last_error_at", "lastErrorTime"),
                ("anti_entropy_last_run", "antiEntropyLastRunTime"),
            ):
                stamp = _time(found.get(key))
                if stamp is not None:
                    row[field] = stamp
            success, failed = found.get("last_success"), found.get("last_error_at")
            if found.get("last_error") and (
                not isinstance(success, int | float)
                or (isinstance(failed, int | float) and failed > success)
            ):
                row["lastError"] = str(found["last_error"])
                errors.append(f"{peer.name}: {found['last_error']}")
            if lag > LAG_THRESHOLD_SECONDS:
                lagging.append(f"{peer.name} {lag:.0f}s behind")
        rows.append(row)
    summary: dict[str, Any] = {"peers": rows}
    if region is not None:
        summary["region"] = region
    unwired = [p for p in peers if p.reason]
    if unwired:
        condition = Condition(
            REPLICATION_HEALTHY,
            "False",
            unwired[0].reason,
            "; ".join(f"{p.name}: {p.message}" for p in unwired),
        )
    elif observation is None:
        condition = Condition(
            REPLICATION_HEALTHY, "Unknown", "StatusPending", "replication status not read yet"
        )
    elif payload is None:
        condition = Condition(
            REPLICATION_HEALTHY, "Unknown", "StatusUnavailable", observation.error or ""
        )
    elif errors:
        condition = Condition(REPLICATION_HEALTHY, "False", "PeerErrors", "; ".join(errors))
    elif lagging:
        condition = Condition(REPLICATION_HEALTHY, "False", "Lagging", "; ".join(lagging))
    else:
        depth = sum(int(r.get("queueDepth", 0)) for r in rows)
        condition = Condition(
            REPLICATION_HEALTHY,
            "True",
            "Replicating",
            f"{len(rows)} peers, {depth} changes queued",
        )
    return summary, condition


def _conditions_by_type(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    items = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in items if isinstance(c, Mapping) and "type" in c}


def deployment_conditions(deployment: Mapping[str, Any] | None) -> list[Condition]:
    """Ready, Progressing and Degraded, read the way `kubectl rollout status` reads them."""
    if deployment is None:
        return [
            Condition(READY, "False", "DeploymentMissing", "the Deployment does not exist yet"),
            Condition(PROGRESSING, "True", "Creating", "creating the Deployment"),
            Condition(DEGRADED, "False", "AsExpected", ""),
        ]
    status = deployment.get("status") or {}
    want = int((deployment.get("spec") or {}).get("replicas", 1))
    generation = int((deployment.get("metadata") or {}).get("generation", 0))
    observed = int(status.get("observedGeneration", 0))
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    total = int(status.get("replicas", 0))
    conditions = _conditions_by_type(deployment)
    progress = conditions.get("Progressing", {})
    counts = f"{updated}/{want} updated, {available}/{want} available"

    deadline = progress.get("status") == "False" and progress.get("reason") == (
        "ProgressDeadlineExceeded"
    )
    rolled_out = observed >= generation and updated >= want and total <= updated
    # After a finished rollout the Deployment keeps reason NewReplicaSetAvailable; pods
    # that become unavailable then are a fault, not progress.
    rolling = not rolled_out or (
        available < want and progress.get("reason") != "NewReplicaSetAvailable"
    )
    if observed < generation:
        counts = f"waiting for the Deployment controller to observe generation {generation}"

    if want == 0:
        ready = Condition(READY, "False", "ScaledToZero", "spec.replicas is 0")
    elif rolled_out and available >= want:
        ready = Condition(READY, "True", "Available", f"{available}/{want} replicas available")
    elif deadline:
        ready = Condition(
            READY, "False", "ProgressDeadlineExceeded", str(progress.get("message", ""))
        )
    else:
        ready = Condition(READY, "False", "RollingOut" if rolling else "Unavailable", counts)

    if deadline:
        progressing = Condition(
            PROGRESSING, "False", "ProgressDeadlineExceeded", str(progress.get("message", ""))
        )
    elif rolling:
        progressing = Condition(PROGRESSING, "True", "RollingOut", counts)
    else:
        progressing = Condition(PROGRESSING, "False", "RolloutComplete", counts)

    failure = conditions.get("ReplicaFailure", {})
    if deadline:
        degraded = Condition(
            DEGRADED, "True", "ProgressDeadlineExceeded", str(progress.get("message", ""))
        )
    elif failure.get("status") == "True":
        degraded = Condition(DEGRADED, "True", "ReplicaFailure", str(failure.get("message", "")))
    elif not rolling and available < want:
        degraded = Condition(DEGRADED, "True", "Unavailable", counts)
    else:
        degraded = Condition(DEGRADED, "False", "AsExpected", "")
    return [ready, progressing, degraded]


def storage_condition(
    spec: models.Spec | None,
    pvc: Mapping[str, Any] | None,
    backends: Backends | None = None,
    ready_replicas: int = 0,
) -> Condition:
    """The volume's state; with S3 or PostgreSQL, also whether the server reaches them
    (`backends`; None for a Registry without external back ends)."""
    storage = spec.storage if spec is not None else None
    seen = backends.readiness if backends is not None else None
    if seen is not None and seen.storage_full:
        # Pushes are refused (507) until space is freed; pulls and deletes still work.
        return Condition(STORAGE_READY, "False", STORAGE_FULL, seen.text)
    if isinstance(storage, models.S3Storage):
        volume = None
    else:
        volume = _volume_condition(storage, pvc)
        if (
            backends is None
            or not (backends.external or backends.problems)
            or volume.status != "True"
        ):
            return volume
    return _backends_condition(backends or Backends(), volume, ready_replicas)


def _backends_condition(
    backends: Backends, volume: Condition | None, ready_replicas: int
) -> Condition:
    if backends.problems:
        return Condition(STORAGE_READY, "False", "SecretMissing", "; ".join(backends.problems))
    seen = backends.readiness
    if seen is not None and seen.code == 200:
        message = "the server reaches its back ends (GET /readyz answers 200)"
        if volume is not None:
            message += f"; {volume.message}"
        return Condition(STORAGE_READY, "True", "Connected", message)
    if seen is not None and seen.code is not None:
        return Condition(
            STORAGE_READY,
            "False",
            "BackendUnavailable",
            f"the server answers {seen.code}: {seen.text}",
        )
    if ready_replicas == 0 and seen is not None:
        # No ready pod behind the Service: the probe failing is the likely cause.
        return Condition(
            STORAGE_READY,
            "False",
            "NoReadyReplica",
            "no replica is ready; one that cannot reach the object store or PostgreSQL"
            " fails its readiness probe and logs why (kubectl logs)",
        )
    return Condition(STORAGE_READY, "Unknown", "Checking", "waiting for the server's /readyz")


def _volume_condition(storage: models.Storage | None, pvc: Mapping[str, Any] | None) -> Condition:
    if storage is None and pvc is None:
        return Condition(STORAGE_READY, "Unknown", "InvalidSpec", "the storage spec is invalid")
    if isinstance(storage, models.EmptyDirStorage):
        return Condition(
            STORAGE_READY, "True", "EmptyDir", "data lives in an emptyDir and is lost with the pod"
        )
    if pvc is None:
        return Condition(STORAGE_READY, "False", "NotFound", "the PersistentVolumeClaim is missing")
    phase = str((pvc.get("status") or {}).get("phase", "Pending"))
    if phase == "Bound":
        return Condition(STORAGE_READY, "True", "Bound", "the PersistentVolumeClaim is bound")
    messages = {
        "Pending": "waiting for a volume to be provisioned and bound",
        "Lost": "the bound PersistentVolume no longer exists",
    }
    return Condition(STORAGE_READY, "False", phase, messages.get(phase, f"phase {phase}"))


def conditions(
    spec: models.Spec | None,
    observed: Observed,
    failure: Failure | None = None,
    node_port_conflict: str | None = None,
    backends: Backends | None = None,
) -> list[Condition]:
    """`node_port_conflict` says why the Registry gets no node proxy (Degraded: the
    registry serves, but kubelets cannot pull from it at localhost); `backends` is what
    is known of its S3 store and PostgreSQL database (None: it uses neither)."""
    found = deployment_conditions(observed.deployment)
    if node_port_conflict is not None and failure is None and found[2].status != "True":
        found[2] = Condition(DEGRADED, "True", "NodePortConflict", node_port_conflict)
    if failure is not None:
        ready = found[0]
        if observed.deployment is None:
            ready = Condition(READY, "False", failure.reason, failure.message)
        found = [
            ready,
            Condition(PROGRESSING, "False", failure.reason, failure.message),
            Condition(DEGRADED, "True", failure.reason, failure.message),
        ]
    replicas = int(((observed.deployment or {}).get("status") or {}).get("readyReplicas", 0))
    found.append(storage_condition(spec, observed.pvc, backends, replicas))
    return found


def render_conditions(
    found: Sequence[Condition],
    previous: Sequence[Mapping[str, Any]],
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """The API form, keeping lastTransitionTime of conditions whose status did not flip."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    result = []
    for condition in found:
        status = condition.status
        old = before.get(condition.type) or {}
        changed = old.get("status") != status or "lastTransitionTime" not in old
        result.append(
            {
                "type": condition.type,
                "status": status,
                "reason": condition.reason,
                "message": condition.message,
                "lastTransitionTime": now if changed else old["lastTransitionTime"],
                "observedGeneration": generation,
            }
        )
    return result


def build(
    owner: models.Owner,
    generation: int,
    spec: models.Spec | None,
    observed: Observed,
    previous: Mapping[str, Any],
    now: str,
    failure: Failure | None = None,
    *,
    peers: Sequence[PeerState] = (),
    replication: ReplicationObservation | None = None,
    pull_endpoint: str | None = None,
    node_port_conflict: str | None = None,
    access: Condition | None = None,
    backends: Backends | None = None,
    tls: tuple[Mapping[str, Any] | None, Condition | None] = (None, None),
) -> dict[str, Any]:
    """The whole `.status` of a Registry; `spec` is None when it could not be parsed.
    `tls` is status.tls and the CertificateReady condition (`serving_tls.plan`).
    `pull_endpoint` is where kubelets pull from (the node proxy), when there is one.
    `access` is the access reconcile's AccessApplied; None keeps the one there is (the
    access reconcile has not said anything since the operator started)."""
    deployment_status = (observed.deployment or {}).get("status") or {}
    found = conditions(spec, observed, failure, node_port_conflict, backends)
    summary = None
    if spec is not None and spec.peers:
        summary, healthy = replication_status(spec.region, peers, replication)
        found.append(healthy)
    if access is not None:
        found.append(access)
    report, certificate = tls
    if certificate is not None:
        found.append(certificate)
    rendered = render_conditions(found, previous.get("conditions") or [], generation, now)
    kept = condition_of(previous, ACCESS_APPLIED)
    if access is None and kept:
        rendered.append(dict(kept))
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "endpoint": (
            names.in_cluster_url(owner.name, owner.namespace, spec.scheme)
            if spec is not None
            else previous.get("endpoint")
            or names.in_cluster_url(owner.name, owner.namespace, "https")
        ),
        "readyReplicas": int(deployment_status.get("readyReplicas", 0)),
        "conditions": rendered,
    }
    if summary is not None:
        status["replication"] = summary
    if spec is not None and spec.ingress is not None:
        status["externalEndpoint"] = spec.ingress.url
    if pull_endpoint is not None:
        status["pullEndpoint"] = pull_endpoint
    if report is not None:
        status["tls"] = dict(report)
    return status
