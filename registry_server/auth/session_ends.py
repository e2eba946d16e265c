"""Logging out of the web UI on every process, and across restarts.

A UI session is a token signed with the registry's key, valid wherever it is shown until
it expires (``auth/configured.py``). Logging out records its token id in the metadata
index (SQLite shared by the workers, PostgreSQL by the replicas) as well as here; every
``interval_seconds`` each process reads the ids ended since it last looked. So a copy of
the cookie stops working at once on the process that ended it and within an interval on
the others, and a restarted process reads them all before it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from registry_server.auth.tokens import LEEWAY_SECONDS
from registry_server.storage.index import MetadataIndex

log = logging.getLogger("registry_server.auth")

# Read again what ended this long before the last look: a transaction that committed
# late (``ended_at`` is stamped before the commit) is still seen.
_OVERLAP_SECONDS = 60.0


class SessionEnds:
    def __init__(
        self,
        index: MetadataIndex,
        interval_seconds: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.interval = interval_seconds
        self._wall = wall
        self._ended: dict[str, float] = {}  # token id -> when it would have expired
        self._looked: float | None = None  # the database's clock at the last read

    def ended(self, token_id: str) -> bool:
        return token_id in self._ended

    async def end(self, token_id: str, expires_at: float) -> None:
        """End a session here at once and, through the index, everywhere (raises when
        the index cannot record it: the caller must not say it is logged out)."""
        expires_at += LEEWAY_SECONDS  # as long as any process may still accept it
        await self.index.end_session(token_id, expires_at)
        self._ended[token_id] = expires_at

    async def sync_once(self) -> None:
        # By the database's clock: replicas whose own clocks disagree miss nothing.
        since = None if self._looked is None else self._looked - _OVERLAP_SECONDS
        ended, self._looked = await self.index.ended_sessions(since)
        for token_id, expires_at in ended:
            self._ended[token_id] = expires_at
        now = self._wall()  # expiry is each process's own judgement, as for the token
        self._ended = {t: e for t, e in self._ended.items() if e > now}

    async def run_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync_once()
                if failing:
                    log.info("ended UI sessions read again")
                failing = False
            except Exception as exc:  # the index is away: what this process knows holds
                if not failing:
                    log.warning("ended UI sessions not read", extra={"error": str(exc)})
                failing = True
