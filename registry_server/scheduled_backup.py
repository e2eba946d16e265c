"""Scheduled online backups (``backup.interval_seconds``): an elected task that writes a
snapshot of the registry into ``backup.dir`` every interval and keeps the newest
``backup.keep``.

Each snapshot is a directory named by its UTC start time, made by
`maintenance.backup` (a consistent copy of the SQLite index, then the blobs it records,
then the tag record; ``index.db`` appears last, so a snapshot without it is incomplete).
Blobs already in the newest complete snapshot are hard-linked from it, so a snapshot
costs the new blobs only, and removing an old one frees only what no newer one shares.
Restoring is copying a snapshot into an empty ``storage.root`` (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
import time
from pathlib import Path

from prometheus_client import Gauge

from registry_server import maintenance
from registry_server.config import BackupConfig

log = logging.getLogger("registry_server.backup")

LAST_SUCCESS = Gauge(
    "berth_backup_last_success_timestamp_seconds", "When the newest complete backup finished"
)
LAST_SECONDS = Gauge("berth_backup_last_duration_seconds", "How long the last backup took")
SNAPSHOTS = Gauge("berth_backup_snapshots", "Complete backups kept in backup.dir")

_NAME = "%Y%m%dT%H%M%SZ"


def complete(directory: Path) -> list[Path]:
    """The complete snapshots in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and (p / maintenance.INDEX).is_file()]
    return sorted(found, key=lambda p: p.name)


def remove(snapshot: Path) -> None:
    """Its index first: a removal cut short leaves an incomplete snapshot, never one
    that looks complete without all it holds."""
    (snapshot / maintenance.INDEX).unlink(missing_ok=True)
    shutil.rmtree(snapshot, ignore_errors=True)


def prune(directory: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete snapshots, and the incomplete ones
    older than the newest complete one (a backup that died). Returns what was removed."""
    kept = complete(directory)
    newest = kept[-1].name if kept else ""
    removed = kept[:-keep] if keep < len(kept) else []
    removed += [
        p
        for p in directory.iterdir()
        if p.is_dir() and p.name < newest and not (p / maintenance.INDEX).is_file()
    ]
    for path in removed:
        remove(path)
    return removed


def run_once(root: Path, settings: BackupConfig, now: float | None = None) -> dict[str, float]:
    """One snapshot now, linked to the newest complete one, then pruning. Blocking.

    A snapshot that fails is removed at once (each retry copied the same new blobs into
    a directory of its own). One whose writes do not fit on the backup volume first
    makes room: the oldest complete snapshot goes (down to one kept) and it is tried
    again; a full backup volume otherwise never freed anything, as pruning follows a
    success."""
    directory = settings.dir
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.fromtimestamp(now or time.time(), datetime.UTC)
    target = directory / stamp.strftime(_NAME)
    while True:
        previous = complete(directory)
        try:
            stats = maintenance.backup(root, target, previous[-1] if previous else None)
        except BaseException as exc:
            full = isinstance(exc, maintenance.BackupVolumeFull)
            shutil.rmtree(target, ignore_errors=True)
            if not full or len(previous) <= 1:
                raise
            log.warning(
                "backup volume full: removing the oldest snapshot to make room",
                extra={"removed": str(previous[0])},
            )
            remove(previous[0])
            continue
        break
    removed = prune(directory, settings.keep)
    stats["removed"] = len(removed)
    return stats


def due_in(settings: BackupConfig, now: float | None = None) -> float:
    """Seconds until the next snapshot is due: an interval after the newest complete one
    (its index file's time), at once when there is none."""
    snapshots = complete(settings.dir)
    if not snapshots:
        return 0.0
    last = (snapshots[-1] / maintenance.INDEX).stat().st_mtime
    return max(0.0, last + settings.interval_seconds - (now or time.time()))


async def backup_forever(root: Path, settings: BackupConfig) -> None:
    """The elected task's body: wait until a snapshot is due, take it, again. A failed
    snapshot is logged and tried again after a tenth of the interval (at most 10 min)."""
    while True:
        await asyncio.sleep(due_in(settings))
        started = time.monotonic()
        try:
            stats = await asyncio.to_thread(run_once, root, settings)
        except Exception:
            log.exception("backup failed", extra={"dir": str(settings.dir)})
            await asyncio.sleep(min(600.0, settings.interval_seconds / 10))
            continue
        LAST_SECONDS.set(time.monotonic() - started)
        LAST_SUCCESS.set(time.time())
        SNAPSHOTS.set(len(complete(settings.dir)))
        log.info("backup written", extra={"dir": str(settings.dir), **stats})
