"""Failed-authentication rate limiting (pure: in memory, clock injected).

Two meters, both counting failures within ``window`` seconds:

- per (account, client): ``limit`` failures of one account from one client address lock
  that pair, and only that pair. A correct secret of the same account from another
  client, or of another account from the same client, still works: nobody can lock out
  a kubelet by failing its robot's password from elsewhere.
- per client: ``client_limit`` failures from one address, whatever the accounts, lock
  the address (a client spraying one password over many names). Failures that name no
  account (a forged token, a malformed header) count here only.

Each meter is a GCRA ("leaky bucket as a meter"): a key holds one number, the time at
which its failures will have drained at ``limit`` per ``window``. A burst of ``limit``
failures is allowed, then one more every ``window / limit`` seconds, so the long-run rate
is the same as a sliding window's while a key costs one float instead of a list of times.
Keys are keyed hashes of 16 bytes (an account name is the client's text and may be long),
and at most ``max_keys`` are kept per meter, the least recently failing forgotten first.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable


class FailureMeter:
    """One GCRA meter over opaque keys."""

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 50_000,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self._clock = clock
        self._max_keys = max_keys
        # key -> when its failures have drained; dict order is least recently failing first.
        self._drained_at: dict[bytes, float] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window > 0

    def __len__(self) -> int:
        return len(self._drained_at)

    def retry_after(self, key: bytes) -> int:
        """Seconds until ``key`` may fail again; 0 when it may try now."""
        if not self.enabled:
            return 0
        drained = self._drained_at.get(key)
        if drained is None:
            return 0
        now = self._clock()
        if drained <= now:
            del self._drained_at[key]
            return 0
        # Blocked while more than limit - 1 failures' worth is still draining.
        wait = drained - now - (self.window - self.window / self.limit)
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def record_failure(self, key: bytes) -> None:
        if not self.enabled:
            return
        now = self._clock()
        drained = self._drained_at.pop(key, now)
        self._drained_at[key] = max(drained, now) + self.window / self.limit
        while len(self._drained_at) > self._max_keys:
            del self._drained_at[next(iter(self._drained_at))]


class FailureLimiter:
    """The two meters of the module docstring, over client addresses and account names."""

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        *,
        client_limit: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 50_000,
    ) -> None:
        self.per_account = FailureMeter(limit, window_seconds, clock=clock, max_keys=max_keys)
        self.per_client = FailureMeter(client_limit, window_seconds, clock=clock, max_keys=max_keys)
        self._salt = secrets.token_bytes(16)

    def _key(self, *parts: str) -> bytes:
        digest = hashlib.blake2b(key=self._salt, digest_size=16)
        for part in parts:
            raw = part.encode("utf-8", "surrogateescape")
            digest.update(len(raw).to_bytes(8, "big") + raw)
        return digest.digest()

    def retry_after(self, client: str, account: str | None = None) -> int:
        """Seconds until ``client`` may try again (as ``account``, when given)."""
        wait = self.per_client.retry_after(self._key(client))
        if account is not None:
            wait = max(wait, self.per_account.retry_after(self._key(account, client)))
        return wait

    def record_failure(self, client: str, account: str | None = None) -> None:
        self.per_client.record_failure(self._key(client))
        if account is not None:
            self.per_account.record_failure(self._key(account, client))
