"""The page cache a measured push writes into.

A server that has run for a while writes new blobs into pages the kernel recycles
(reclaimed cache). A freshly booted virtual machine instead has most of its memory never
touched, and its hypervisor backs such a page only on first use: on this machine 256 MiB
written (1 MiB writes) into recycled pages took 0.06 s, into untouched ones 0.53-0.94 s,
all of it in the copy into the cache (``copy_folio_from_iter_atomic``). Pushes that keep
their blobs grow the cache into untouched memory round after round, so the push rows
sank from round to round while the disk limit (whose file is deleted each time)
measured recycled pages.

Before each measured push the bench drops the cached pages of the blobs the servers
store (``posix_fadvise(DONTNEED)``, no privilege needed), so every server's write, like
the limit's, lands on recycled pages; the servers' metadata (Berth's index, distribution's
link files) and the client's data stay cached, as on a server that has run a while.
"""

from __future__ import annotations

import os
from pathlib import Path

NOTE = "the stored blobs' pages dropped"


def evict_blobs(root: Path) -> int:
    """Write dirty pages back, then drop from the cache the pages of every blob stored
    under ``root``: files named ``data`` in a ``blobs`` folder, the layout of both
    servers' filesystem storage. Returns how many files."""
    os.sync()  # dirty pages are not dropped
    count = 0
    for path in root.rglob("data"):
        if "blobs" not in path.relative_to(root).parts or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        count += 1
    return count
