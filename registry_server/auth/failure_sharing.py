"""One failed-authentication limit for every process of a registry.

Each worker process and each replica keeps its meters in memory (``auth/ratelimit.py``)
and answers from them, so a refusal never waits on the database. Every
``interval_seconds`` each process adds the failures it recorded since to the metadata
index (SQLite shared by the workers, or PostgreSQL shared by the replicas) and folds in
every key still draining there, whoever recorded it. A client spreading its guesses over
N processes therefore meets one limit, late by at most one interval: at the defaults
(5 failures a minute) a burst across all of them gets about one interval's worth of
bcrypt-bounded guesses more, where the meters alone would give it N times the limit.
Keys are hashed with the index's instance id, which every sharing process reads alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from registry_server.auth.ratelimit import FailureLimiter
from registry_server.storage.index import MetadataIndex

log = logging.getLogger("registry_server.auth")


class FailureSharing:
    def __init__(
        self,
        limiter: FailureLimiter,
        index: MetadataIndex,
        interval_seconds: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self.index = index
        self.interval = interval_seconds
        self._wall = wall
        limiter.share(index.instance_id.encode())

    async def sync_once(self) -> None:
        """Send this process's new failures, then take in everyone's."""
        new = self.limiter.take_new()
        meters = self.limiter.meters
        now = self._wall()
        try:
            if new:
                entries = [
                    (name, key, count * meters[name].step) for (name, key), count in new.items()
                ]
                await self.index.add_auth_failures(entries, now)
            shared = await self.index.draining_auth_failures(now)
        except Exception:
            # Not sent: counted again next time (the local meters already hold them).
            for pair, count in new.items():
                self.limiter.requeue(pair, count)
            raise
        # The meters run on their own clock (monotonic): carry the time left over.
        local_now = self.limiter.clock()
        for name, key, drained_at in shared:
            meter = meters.get(name)
            if meter is not None:
                meter.merge(key, local_now + (drained_at - now))

    async def run_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.sync_once()
                if failing:
                    log.info("failed-authentication limits shared again")
                failing = False
            except Exception as exc:  # the index is away: local limits still hold
                if not failing:
                    log.warning(
                        "failed-authentication limits not shared", extra={"error": str(exc)}
                    )
                failing = True
            await asyncio.sleep(self.interval)
