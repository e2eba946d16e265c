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
    # (kind, namespace, name) -> resourceVersion our last apply produced.
    written: dict[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)

    def own_write(self, kind: str, namespace: str, name: str, resource_version: str) -> bool:
        """Whether a child's watch event only echoes our own apply: nothing to repair."""
        return self.written.get((kind, namespace, name)) == resource_version

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.written.pop((kind, namespace, name), None)

    async def reconcile(self, namespace: str, name: str) -> reconcile.Outcome:
        """Reconcile one Registry (never two at once for the same one) and post its events."""

        async def job() -> reconcile.Outcome:
            outcome = await asyncio.to_thread(
                reconcile.reconcile, self.kube, namespace, name, self.options
            )
            for (kind, child), version in outcome.written.items():
                self.written[(kind, namespace, child)] = version
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
