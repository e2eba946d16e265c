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

Several processes (workers, replicas) share their meters through the metadata index
(``auth/failure_sharing.py``): each notes the failures it records (``take_new``), and
folds in the state the others recorded (``merge``); a shared key salt makes their keys
the same.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import ipaddress
import math
import secrets
import time
from collections.abc import Callable, Iterator


def metered_client(client: str) -> str:
    """What the per-client meter counts a client address as: an IPv6 address by its /64,
    which one host may be given whole (else each of its 2^64 addresses had a limit of its
    own). The per-account meter keeps the whole address: cloud subnets give all their
    machines one /64, and one node failing a robot's secret must not lock out the rest."""
    client = same_client(client)
    try:
        return str(ipaddress.IPv6Network((ipaddress.IPv6Address(client), 64), strict=False))
    except ValueError:  # IPv4 (a mapped one included), or not an address
        return client


def same_client(client: str) -> str:
    """An address as one text: an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client  # not an address (a test's name, a header's text): as it is
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


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

    @property
    def step(self) -> float:
        """Seconds one failure adds to its key's drain time."""
        return self.window / self.limit if self.enabled else 0.0

    def clear(self) -> None:
        self._drained_at.clear()

    def merge(self, key: bytes, drained_at: float) -> None:
        """Fold in another process's state for ``key`` (on this meter's clock): the later
        drain time wins, so failures counted both here and there count once."""
        if not self.enabled or drained_at <= self._drained_at.get(key, self._clock()):
            return
        self._drained_at.pop(key, None)
        self._drained_at[key] = drained_at
        while len(self._drained_at) > self._max_keys:
            del self._drained_at[next(iter(self._drained_at))]

    def __len__(self) -> int:
        return len(self._drained_at)

    def retry_after(self, key: bytes, pending: int = 0) -> int:
        """Seconds until ``key`` may fail again; 0 when it may try now. ``pending``:
        attempts of the key being checked now, counted as the failures they may be."""
        if not self.enabled:
            return 0
        now = self._clock()
        drained = self._drained_at.get(key)
        if drained is not None and drained <= now:
            del self._drained_at[key]
            drained = None
        if drained is None and not pending:
            return 0
        drained = (drained or now) + pending * self.step
        # Blocked while more than limit - 1 failures' worth is still draining.
        wait = drained - now - (self.window - self.step)
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
        self.clock = clock
        self._salt = secrets.token_bytes(16)
        # Failures recorded since the last take_new, per (meter name, key): for sharing.
        self._new: collections.Counter[tuple[str, bytes]] = collections.Counter()
        self._sharing = False
        # Attempts being checked now (a password hash takes a while), per key, by the
        # secret tried: without them, guesses sent all at once were all checked before
        # the first failure was recorded. Distinct secrets count: nodes logging in at
        # once with one robot's secret share one check and count once. This process's
        # own: each worker admits at most a burst of them.
        self._pending: dict[bytes, collections.Counter[bytes]] = {}

    @property
    def meters(self) -> dict[str, FailureMeter]:
        return {"account": self.per_account, "client": self.per_client}

    def share(self, salt: bytes) -> None:
        """Key with ``salt`` (the same in every sharing process) and note new failures
        for ``take_new``. Keys recorded before are dropped: they were hashed otherwise."""
        self._salt = hashlib.blake2b(salt, digest_size=16).digest()
        self._sharing = True
        for meter in self.meters.values():
            meter.clear()

    def take_new(self) -> dict[tuple[str, bytes], int]:
        """The failures recorded since the last call, per (meter name, key)."""
        new, self._new = dict(self._new), collections.Counter()
        return new

    def requeue(self, pair: tuple[str, bytes], count: int) -> None:
        """Give back failures taken but not shared, for the next ``take_new``."""
        self._new[pair] += count

    def _key(self, *parts: str) -> bytes:
        digest = hashlib.blake2b(key=self._salt, digest_size=16)
        for part in parts:
            raw = part.encode("utf-8", "surrogateescape")
            digest.update(len(raw).to_bytes(8, "big") + raw)
        return digest.digest()

    def retry_after(self, client: str, account: str | None = None) -> int:
        """Seconds until ``client`` may try again (as ``account``, when given), counting
        its attempts under way (``checking``) as failures."""
        key = self._key(metered_client(client))
        wait = self.per_client.retry_after(key, len(self._pending.get(key, ())))
        if account is not None:
            pair = self._key(account, same_client(client))
            wait = max(wait, self.per_account.retry_after(pair, len(self._pending.get(pair, ()))))
        return wait

    @contextlib.contextmanager
    def checking(self, client: str, account: str, secret: str) -> Iterator[None]:
        """``secret`` of ``account`` from ``client`` is being checked for the block."""
        attempt = self._key("attempt", secret)  # kept hashed, for the check's length only
        keys = (self._key(metered_client(client)), self._key(account, same_client(client)))
        for key in keys:
            self._pending.setdefault(key, collections.Counter())[attempt] += 1
        try:
            yield
        finally:
            for key in keys:
                attempts = self._pending[key]
                attempts[attempt] -= 1
                if attempts[attempt] <= 0:
                    del attempts[attempt]
                if not attempts:
                    del self._pending[key]

    def record_failure(self, client: str, account: str | None = None) -> None:
        keys = [("client", self._key(metered_client(client)))]
        if account is not None:
            keys.append(("account", self._key(account, same_client(client))))
        for name, key in keys:
            meter = self.meters[name]
            meter.record_failure(key)
            if self._sharing and meter.enabled:
                self._new[(name, key)] += 1
