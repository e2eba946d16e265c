"""How the API server's error answers are classified (retry, or report and wait)."""

from __future__ import annotations

import json

import pytest

from registry_operator.kube import errors


def _body(message: str, reason: str = "Forbidden") -> str:
    return json.dumps({"kind": "Status", "message": message, "reason": reason})


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (404, "not found", errors.NotFound),
        (409, "conflict", errors.Conflict),
        (422, 'Secret "x" is invalid: data: Too long', errors.Rejected),
        # The authorizer: RBAC is being installed or fixed, so try again.
        (403, 'secrets is forbidden: User "system:serviceaccount:berth:op" cannot create '
              'resource "secrets" in API group "" in the namespace "a"', errors.Retryable),
        # Admission: the same request will be refused again; report it.
        (403, 'persistentvolumeclaims "main-data" is forbidden: only dynamically provisioned '
              "pvc can be resized and the storageclass that provisions the pvc must support "
              "resize", errors.Rejected),
        (403, 'secrets "x" is forbidden: exceeded quota: q, requested: count/secrets=1',
         errors.Rejected),
        (429, "slow down", errors.Retryable),
        (503, "unavailable", errors.Retryable),
    ],
)  # fmt: skip
def test_classification(status: int, message: str, kind: type[errors.KubeError]) -> None:
    found = errors.from_status(status, _body(message))
    assert type(found) is kind and found.args[0] == message
