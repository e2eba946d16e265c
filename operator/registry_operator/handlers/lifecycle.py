"""Operator startup: make sure the peering object exists before Kopf starts using it."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from registry_operator.handlers import runtime
from registry_operator.kube import errors


async def ensure_peering(*, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    # Kopf only patches an existing peering object; were it missing, every replica would
    # believe it is alone and all of them would act.
    state = runtime.of(memo)
    if state.peering is None:
        return
    manifest = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": state.peering},
    }
    try:
        await asyncio.to_thread(state.kube.create, manifest)
        logger.info("created ClusterKopfPeering %s", state.peering)
    except errors.Conflict:
        pass
    except errors.KubeError as exc:
        logger.warning("cannot ensure ClusterKopfPeering %s: %s", state.peering, exc)
