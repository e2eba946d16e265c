"""Checking secrets against bcrypt hashes without stalling the event loop.

bcrypt is slow on purpose (a quarter of a second at cost 12), and clients send Basic
credentials with every request, so each check runs in a worker thread, concurrent checks of
the same credentials share one computation, and a success is remembered for a short while.
The memory holds only a keyed hash (HMAC with a per-process random key) of the secret and
the stored hash, never the secret itself; a changed password hash never matches an old entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection

import bcrypt

from registry_server.auth import htpasswd

# Checked for an unknown name when no account exists at all (no cost to copy).
_DUMMY_COST = 10
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class PasswordVerifier:
    def __init__(
        self,
        cache_seconds: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._cache_seconds = cache_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._ok: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}
        self._dummies: dict[int, str] = {}
        self.computations = 0  # bcrypt checks actually run (for tests and curiosity)

    def _cache_key(self, secret: str, stored_hash: str) -> bytes:
        message = stored_hash.encode() + b"\0" + secret.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _cached(self, key: bytes) -> bool:
        expires = self._ok.get(key)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._ok[key]
            return False
        return True

    def _remember(self, key: bytes) -> None:
        self._ok[key] = self._clock() + self._cache_seconds
        self._ok.move_to_end(key)
        while len(self._ok) > self._max_entries:
            self._ok.popitem(last=False)

    def _check(self, secret: str, stored_hash: str) -> bool:
        self.computations += 1
        try:
            return bcrypt.checkpw(secret.encode("utf-8", "surrogateescape"), stored_hash.encode())
        except ValueError:
            return False

    async def verify(self, secret: str, stored_hash: str) -> bool:
        key = self._cache_key(secret, stored_hash)
        if self._cached(key):
            return True
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._compute(key, secret, stored_hash))
            self._inflight[key] = task
        # A caller that goes away (client disconnected) does not cancel the check that
        # other callers with the same credentials are waiting for.
        return await asyncio.shield(task)

    async def _compute(self, key: bytes, secret: str, stored_hash: str) -> bool:
        try:
            ok = await asyncio.to_thread(self._check, secret, stored_hash)
        finally:
            del self._inflight[key]
        if ok:
            self._remember(key)
        return ok

    async def check(self, secret: str, stored_hash: str | None, costs: Collection[int]) -> bool:
        """Whether ``secret`` matches ``stored_hash`` (None: the account does not exist).

        A refusal does the same bcrypt work whatever the name: one check at each cost in
        ``costs`` (every cost the accounts' hashes use), against the account's own hash at
        its cost and against a dummy hash at the others. So a wrong secret for a robot
        (cost 5), for the admin (cost 10) and for a name nobody has take the same time,
        and timing does not tell which names exist. A success returns at once: it
        tells nothing to someone who already has the secret.
        """
        if stored_hash is not None and await self.verify(secret, stored_hash):
            return True
        own = htpasswd.bcrypt_cost(stored_hash) if stored_hash is not None else None
        for cost in sorted(costs) or [_DUMMY_COST]:
            if cost != own:
                await asyncio.to_thread(self._check, secret, self._dummy(cost))
        return False

    def _dummy(self, cost: int) -> str:
        # A well-formed hash of nothing: checking it costs what the cost says, and it
        # never matches (a random salt and digest, no password behind them).
        dummy = self._dummies.get(cost)
        if dummy is None:
            salt = bcrypt.gensalt(cost).decode()
            digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
            dummy = self._dummies[cost] = salt + digest
        return dummy

    def forget(self) -> None:
        self._ok.clear()
