"""Webhook notifications: the durable change log, delivered to each endpoint as envelopes.

Every local tag push, untagged manifest push and delete is written to the change log in
the same transaction as the change itself (the replication outbox); each endpoint has
its own cursor in that log, so an event survives a receiver that is down and a server
that is killed, and is delivered at least once, in order. The envelope is CNCF
distribution's (``application/vnd.docker.distribution.events.v1+json``), so receivers
written for ``registry:2`` work unchanged; event ids are stable across redeliveries.
With several replicas on one database, each endpoint is delivered to by one replica at a
time, the one elected for its cursor's name (``storage/election.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import Counter, Gauge

from registry_server.config import EndpointConfig, NotificationsConfig, check_header
from registry_server.events import replies
from registry_server.events.background import run_elected
from registry_server.events.peer_client import ssl_context
from registry_server.storage.election import Election, LocalElection
from registry_server.storage.index import Change, ManifestRecord, MetadataIndex
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.notifications")

ENVELOPE_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"

DELIVERED = Counter(
    "berth_notifications_delivered_total", "Events delivered to an endpoint", ["endpoint"]
)
FAILED = Counter(
    "berth_notifications_errors_total", "Failed delivery attempts to an endpoint", ["endpoint"]
)
PENDING = Gauge("berth_notifications_pending", "Events not yet delivered", ["endpoint"])

_COUNT_SECONDS = 1.0  # how often a busy endpoint's queue is counted

_ACTIONS = {
    "tag": "push",
    "manifest": "push",
    "delete_tag": "delete",
    "delete_manifest": "delete",
    "expire_tag": "delete",  # retention (actor berth:retention)
    "expire_manifest": "delete",
}


def cursor_name(endpoint: EndpointConfig) -> str:
    """The endpoint's cursor in the change log (':' keeps it apart from peer names), and
    the name of its elected task."""
    return f"webhook:{endpoint.name}"


@dataclass(frozen=True)
class Source:
    """Which registry instance an event comes from."""

    addr: str  # host:port
    instance_id: str
    base_url: str  # for the target's url
    log_id: str = ""  # the index's own id: event ids stay the same when redelivered


def event(change: Change, manifest: ManifestRecord | None, source: Source) -> dict[str, Any]:
    """One event of an envelope (pure). ``manifest`` is the pushed manifest, if still stored."""
    target: dict[str, Any] = {"repository": change.repo}
    if manifest is not None:
        target["mediaType"] = manifest.media_type
        target["size"] = manifest.size
        target["length"] = manifest.size
    if change.digest:
        target["digest"] = change.digest
        target["url"] = f"{source.base_url}/v2/{change.repo}/manifests/{change.digest}"
    if change.tag:
        target["tag"] = change.tag
    moment = datetime.datetime.fromtimestamp(change.created, datetime.UTC)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"berth:{source.log_id}:{change.seq}")),
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
        "action": _ACTIONS[change.op],
        "target": target,
        "actor": {"name": change.actor} if change.actor else {},
        "source": {"addr": source.addr, "instanceID": source.instance_id},
    }


def wanted(endpoint: EndpointConfig, item: Mapping[str, Any]) -> bool:
    media_type = item["target"].get("mediaType")
    return item["action"] not in endpoint.ignore_actions and (
        media_type is None or media_type not in endpoint.ignore_media_types
    )


class DeliveryError(Exception):
    pass


def read_headers(directory: Path | None) -> dict[str, str]:
    """Headers from a mounted Secret: one file per header (the kubelet's dot-entries and
    anything not a file are skipped)."""
    if directory is None:
        return {}
    found = {
        path.name: path.read_bytes().decode("utf-8").strip()
        for path in sorted(directory.iterdir())
        if not path.name.startswith(".") and path.is_file()
    }
    for name, value in found.items():
        check_header(name, value)
    return found


class Notifier:
    """One delivery loop per endpoint, run by the process elected for it."""

    def __init__(
        self,
        config: NotificationsConfig,
        index: MetadataIndex,
        source: Source,
        election: Election | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.source = source
        self.election = election if election is not None else LocalElection()
        self._wakes = {e.name: asyncio.Event() for e in config.endpoints}
        self._tasks: list[asyncio.Task[None]] = []
        self._counted: dict[str, float] = {}  # cursor -> when its queue was last counted

    async def start(self) -> None:
        for endpoint in self.config.endpoints:
            loop = functools.partial(self._loop, endpoint)
            self._tasks.append(
                asyncio.create_task(run_elected(self.election, cursor_name(endpoint), loop))
            )

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)

    def wake(self) -> None:
        """A local change was logged: deliver now instead of at the next poll."""
        for flag in self._wakes.values():
            flag.set()

    async def _loop(self, endpoint: EndpointConfig) -> None:
        timeout = aiohttp.ClientTimeout(total=endpoint.timeout_seconds)
        tls = ssl_context(endpoint.url, endpoint.tls_verify, endpoint.ca_file)
        cursor = cursor_name(endpoint)
        wake = self._wakes[endpoint.name]
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self._round(session, tls, endpoint, cursor, wake)
                except Exception:  # the loop must outlive anything one round throws
                    log.exception("notification loop failed", extra={"endpoint": endpoint.name})
                    FAILED.labels(endpoint.name).inc()
                    await asyncio.sleep(endpoint.retry_max_seconds * random.uniform(0.5, 1.0))

    async def _round(
        self,
        session: aiohttp.ClientSession,
        tls: Any,
        endpoint: EndpointConfig,
        cursor: str,
        wake: asyncio.Event,
    ) -> None:
        wake.clear()  # before reading: a change logged after the read sets it again
        changes = await self.index.pending_changes(cursor, endpoint.batch)
        # Counting reads the whole queue: once a second while a backlog drains.
        now = time.monotonic()
        if not changes or now - self._counted.get(cursor, float("-inf")) >= _COUNT_SECONDS:
            self._counted[cursor] = now
            depth, _ = await self.index.queue_stats(cursor)
            PENDING.labels(endpoint.name).set(depth)
        if not changes:
            # Other worker processes log changes too: poll as well as wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            return
        events = [e for e in [await self._event(c) for c in changes] if wanted(endpoint, e)]
        if events:
            await self._deliver(session, tls, endpoint, events)
        await self.index.ack_change(cursor, changes[-1].seq)

    async def _event(self, change: Change) -> dict[str, Any]:
        manifest = None
        if _ACTIONS[change.op] == "push" and change.digest:
            manifest = await self.index.get_manifest(change.repo, change.digest, content=False)
        return event(change, manifest, self.source)

    async def _deliver(
        self,
        session: aiohttp.ClientSession,
        tls: Any,
        endpoint: EndpointConfig,
        events: list[dict[str, Any]],
    ) -> None:
        """Until the endpoint takes them: at least once, never skipped."""
        body = json.dumps({"events": events}).encode()
        attempt = 0
        while True:
            try:
                headers = {
                    **dict(endpoint.headers),
                    **read_headers(endpoint.headers_dir),
                    "Content-Type": ENVELOPE_MEDIA_TYPE,
                }
                async with session.post(
                    endpoint.url, data=body, headers=headers, ssl=tls, allow_redirects=False
                ) as response:
                    await replies.read(response)  # nothing in it is used: a bounded drain
                    # Like distribution: any 2xx or 3xx is taken as delivered.
                    if not 200 <= response.status < 400:
                        raise DeliveryError(f"HTTP {response.status}")
            except (
                TimeoutError,
                aiohttp.ClientError,
                OSError,
                ValueError,  # a header file that is not a valid header
                DeliveryError,
            ) as exc:
                FAILED.labels(endpoint.name).inc()
                attempt += 1
                delay = min(endpoint.retry_max_seconds, 0.5 * 2 ** min(attempt, 10))
                log.warning(
                    "notification delivery failed; retrying",
                    extra={"endpoint": endpoint.name, "error": repr(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            else:
                DELIVERED.labels(endpoint.name).inc(len(events))
                return
