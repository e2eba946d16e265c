"""Free space on the storage volume: the write gate, and the reserve that lets deletes commit.

Pushes are refused (``StorageFull``) once the volume's free space falls below
``min_free_bytes``, before they start writing, and in flight at the next chunk; pulls and
deletes go on. A file of ``reserve_bytes`` is preallocated on the volume: when an index
transaction that frees space (a delete, a collection) fails for want of space, the reserve
is released and the transaction retried, so a delete commits even on a volume with zero
bytes free. The state is polled (``statvfs``, in a thread) and also set at once when a
write meets ENOSPC; it clears by itself when space comes back, and the reserve is made
again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Gauge

from registry_server.protocol.sizes import format_bytes
from registry_server.storage.driver import StorageFull
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.storage")

FREE = Gauge("berth_storage_free_bytes", "Free bytes on the storage volume (the reserve excluded)")
TOTAL = Gauge("berth_storage_total_bytes", "Size of the storage volume")
FULL = Gauge("berth_storage_full", "1 while writes are refused because the volume is full")
RESERVE = Gauge("berth_storage_reserve_bytes", "Bytes held in reserve for deletes to commit")

RESERVE_FILE = "space-reserve"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


@contextlib.contextmanager
def full_as_storage_full() -> Iterator[None]:
    """ENOSPC/EDQUOT from the block below, as StorageFull (the one error the API maps)."""
    try:
        yield
    except OSError as exc:
        if is_full_error(exc):
            raise StorageFull(str(exc)) from None
        raise


class SpaceMonitor:
    """One per process. Without a root (nothing stored locally) the gate is always open."""

    def __init__(
        self,
        root: Path | None,
        min_free_bytes: int = 0,
        reserve_bytes: int = 0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.reserve_bytes = reserve_bytes if root is not None else 0
        self.poll_seconds = poll_seconds
        self.free_bytes: int | None = None
        self.total_bytes: int | None = None
        self._full = False
        self._lock = threading.Lock()  # the reserve is released from the writer thread
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        return self._full

    @property
    def reserve_path(self) -> Path | None:
        return self.root / RESERVE_FILE if self.root is not None and self.reserve_bytes else None

    def require_writable(self) -> None:
        """Raise StorageFull while the volume is full: called before a push writes."""
        if self._full:
            raise StorageFull(self.describe())

    def describe(self) -> str:
        """What /readyz/writes and a refused push say (the operator shows it as is)."""
        free, total = self.free_bytes, self.total_bytes
        if free is None:
            return "storage full: unknown free space on the registry's volume"
        if not total:
            return f"storage full: {format_bytes(free)} free on the registry's volume"
        used = 100 * (total - free) / total
        return (
            f"storage full: {format_bytes(free)} free of {format_bytes(total)} ({used:.0f}% used)"
            " on the registry's volume"
        )

    def note_full(self) -> None:
        """A write met ENOSPC: refuse writes at once (the next poll clears it if wrong)."""
        if not self._full:
            log.warning("storage full: writes refused until space is freed")
        self._full = True
        FULL.set(1)

    # -- the reserve ---------------------------------------------------------------------

    def _reserve_size(self) -> int:
        path = self.reserve_path
        if path is None:
            return 0
        try:
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def release_reserve(self) -> bool:
        """Free the reserve so a delete can commit; True if it freed anything (blocking:
        called from the index's writer thread)."""
        path = self.reserve_path
        with self._lock:
            if path is None or self._reserve_size() == 0:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.truncate(path, 0)
            log.warning("storage full: reserve released so that deletes can commit")
        self.note_full()
        RESERVE.set(0)
        return True

    def _refill_reserve(self) -> None:
        path = self.reserve_path
        if path is None:
            return
        with self._lock:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                if not is_full_error(exc):
                    raise
                # Not enough room for all of it: keep none rather than a part.
                with contextlib.suppress(FileNotFoundError):
                    os.truncate(path, 0)
        RESERVE.set(self._reserve_size())

    # -- polling -------------------------------------------------------------------------

    def check(self) -> bool:
        """Measure the volume and update the state (blocking: run it in a thread)."""
        if self.root is None:
            return False
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        self.total_bytes = stat.f_blocks * stat.f_frsize
        held = self._reserve_size()
        # Make the reserve again before reopening writes, and only with room to spare.
        refill = self.reserve_bytes and held < self.reserve_bytes
        if refill and free >= self.min_free_bytes + self.reserve_bytes:
            self._refill_reserve()
            stat = os.statvfs(self.root)
            free = stat.f_bavail * stat.f_frsize
            held = self._reserve_size()
        self.free_bytes = free
        full = free < self.min_free_bytes or (bool(self.reserve_bytes) and held == 0)
        if self._full and not full:
            log.info("storage no longer full: writes accepted again", extra={"free": free})
        self._full = full
        FREE.set(free)
        TOTAL.set(self.total_bytes)
        FULL.set(1 if full else 0)
        RESERVE.set(held)
        return full

    async def start(self) -> None:
        if self.root is None:
            return
        await asyncio.to_thread(self.check)
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await asyncio.to_thread(self.check)
            except OSError:  # the volume vanished for a moment: keep the last state
                log.warning("cannot measure the storage volume", exc_info=True)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])

    async def pressure(self, seconds: float, every: float = 2.0) -> bool:
        """Sleep up to ``seconds``; return True early (every ``every`` seconds) while the
        volume is full, so the collector frees deleted content promptly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, every))
            if self._full:
                return True
