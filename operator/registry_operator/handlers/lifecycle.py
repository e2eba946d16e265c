"""Operator startup and cleanup: make sure the peering object exists before Kopf starts
using it; start the poller of every Registry and the watch of the children, and stop
them at the end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from registry_operator.handlers import child_watch, polling, runtime
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


def polling_starter(
    *, resync_seconds: float, poll_seconds: float
) -> Callable[..., Awaitable[None]]:
    """The startup handler that starts the poller (it waits for Kopf's gates itself)."""

    async def start_polling(*, memo: Any, **_: Any) -> None:
        state = runtime.of(memo)
        poller = polling.Poller(state, resync_seconds=resync_seconds, poll_seconds=poll_seconds)
        state.poller = asyncio.get_running_loop().create_task(poller.run(), name="berth poller")

    return start_polling


async def stop_polling(*, memo: Any, **_: Any) -> None:
    state = runtime.of(memo)
    task, state.poller = state.poller, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def start_child_watch(*, memo: Any, **_: Any) -> None:
    state = runtime.of(memo)
    state.child_watch = child_watch.ChildWatch(
        state, asyncio.get_running_loop(), namespaces=state.namespaces_watched
    )
    state.child_watch.start()


async def stop_child_watch(*, memo: Any, **_: Any) -> None:
    state = runtime.of(memo)
    watch, state.child_watch = state.child_watch, None
    if watch is not None:
        await asyncio.to_thread(watch.stop)
