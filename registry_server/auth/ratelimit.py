"""Failed-authentication rate limiting per client (pure: in memory, clock injected).

A sliding window: a client that failed ``limit`` times within ``window`` seconds is refused
until its oldest counted failure leaves the window. Memory is bounded: at most
``max_clients`` clients are tracked, the least recently failing are forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class FailureLimiter:
    def __init__(
        self,
        limit: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self._clock = clock
        self._max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window > 0

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0 when it may try now."""
        if not self.enabled:
            return 0
        now = self._clock()
        times = self._recent(client, now)
        if times is None or len(times) < self.limit:
            return 0
        # The window must slide past enough failures to go below the limit.
        release = times[len(times) - self.limit] + self.window
        return max(1, math.ceil(release - now))

    def record_failure(self, client: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        times = self._recent(client, now) or deque()
        times.append(now)
        # More than `limit` old entries are never needed to compute the release time.
        while len(times) > self.limit:
            times.popleft()
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)
