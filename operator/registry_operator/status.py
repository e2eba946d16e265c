"""Derive a Registry's status from what its children report. Pure: no I/O here.

Conditions follow the Kubernetes API conventions: `type`, `status` ("True", "False",
"Unknown"), a CamelCase `reason`, a human `message`, `lastTransitionTime` (changed only
when `status` flips) and the `observedGeneration` they were computed for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from registry_operator import models
from registry_operator.rendering import names

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
STORAGE_READY = "StorageReady"


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


def storage_condition(storage: models.Storage | None, pvc: Mapping[str, Any] | None) -> Condition:
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
    spec: models.Spec | None, observed: Observed, failure: Failure | None = None
) -> list[Condition]:
    found = deployment_conditions(observed.deployment)
    if failure is not None:
        ready = found[0]
        if observed.deployment is None:
            ready = Condition(READY, "False", failure.reason, failure.message)
        found = [
            ready,
            Condition(PROGRESSING, "False", failure.reason, failure.message),
            Condition(DEGRADED, "True", failure.reason, failure.message),
        ]
    found.append(storage_condition(spec.storage if spec else None, observed.pvc))
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
) -> dict[str, Any]:
    """The whole `.status` of a Registry; `spec` is None when it could not be parsed."""
    deployment_status = (observed.deployment or {}).get("status") or {}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "endpoint": names.in_cluster_url(owner.name, owner.namespace),
        "readyReplicas": int(deployment_status.get("readyReplicas", 0)),
        "conditions": render_conditions(
            conditions(spec, observed, failure),
            previous.get("conditions") or [],
            generation,
            now,
        ),
    }
    if spec is not None and spec.ingress is not None:
        status["externalEndpoint"] = spec.ingress.url
    return status
