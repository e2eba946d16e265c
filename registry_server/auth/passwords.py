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
from collections.abc import Callable

import bcrypt

# Checked for unknown users so that a wrong name costs as much as a wrong password.
_DUMMY_COST = 12


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
        self._dummy: bytes | None = None
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

    async def burn(self, secret: str) -> None:
        """Spend as long as a real check would, for a user that does not exist."""
        if self._dummy is None:
            self._dummy = await asyncio.to_thread(
                bcrypt.hashpw, secrets.token_bytes(16), bcrypt.gensalt(_DUMMY_COST)
            )
        await asyncio.to_thread(self._check, secret, self._dummy.decode())

    def forget(self) -> None:
        self._ok.clear()
