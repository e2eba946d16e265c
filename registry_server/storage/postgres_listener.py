"""Wake-ups across replicas: ``LISTEN`` for the change log's notifications.

A change logged on one replica must be delivered by whichever replica is elected for
each peer and webhook endpoint. Its own process wakes its loops directly; the others
would only see the change at their next poll (a second). A trigger on the change log
(migration 2) sends ``NOTIFY berth_changes`` when a transaction that logged something
commits; this listener, one connection per competing process, turns that into the same
wake-up. It only makes delivery sooner: a notification lost while reconnecting is
caught by the poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.election")

CHANNEL = "berth_changes"


class ChangeListener:
    def __init__(
        self, dsn: str, replica_id: str, on_change: Callable[[], None], check_seconds: float = 10
    ) -> None:
        extra: dict[str, str | int] = {
            "application_name": f"berth-listen:{replica_id}"[:63],
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }
        if "connect_timeout" not in conninfo_to_dict(dsn):
            extra["connect_timeout"] = 10
        self._dsn = make_conninfo(dsn, **extra)
        self._on_change = on_change
        self.check_seconds = check_seconds
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._failures += 1
                log.warning("change listener lost its connection", extra={"error": str(exc)})
                await asyncio.sleep(min(2.0**self._failures, 30.0))

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._failures = 0
            self._on_change()  # whatever was logged while nobody listened
            while True:
                async for _ in conn.notifies(timeout=self.check_seconds):
                    self._on_change()
                # Quiet for a while: make sure the session is still there.
                await asyncio.wait_for(conn.execute("SELECT 1"), 10)
