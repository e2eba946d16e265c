"""What every handler shares: the API client, the options and the per-Registry queue."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

import kopf

from registry_operator import coalescing, reconcile
from registry_operator.kube import client as kube_client

Key = tuple[str, str]  # (namespace, name) of a Registry


@dataclasses.dataclass
class Runtime:
    kube: kube_client.Client
    peering: str | None = None  # the ClusterKopfPeering name; None when standalone
    options: reconcile.Options = dataclasses.field(default_factory=reconcile.Options)
    queue: coalescing.Coalescer[Key, reconcile.Outcome] = dataclasses.field(
        default_factory=coalescing.Coalescer
    )

    async def reconcile(self, namespace: str, name: str) -> reconcile.Outcome:
        """Reconcile one Registry (never two at once for the same one) and post its events."""

        async def job() -> reconcile.Outcome:
            outcome = await asyncio.to_thread(
                reconcile.reconcile, self.kube, namespace, name, self.options
            )
            # Posted here, inside the coalesced job, so callers sharing it do not repeat them.
            if outcome.ref is not None:
                for event in outcome.events:
                    kopf.event(
                        kopf.Body(cast(kopf.RawBody, dict(outcome.ref))),
                        type=event.type,
                        reason=event.reason,
                        message=event.message,
                    )
            return outcome

        return await self.queue.run((namespace, name), job)


def of(memo: Any) -> Runtime:
    runtime = getattr(memo, "berth", None)
    if not isinstance(runtime, Runtime):
        raise RuntimeError("the operator memo carries no Runtime: start via registry_operator")
    return runtime
