"""The page cache a measured push writes into.

A server that has run for a while writes new blobs into pages the kernel recycles
(reclaimed clean cache). A freshly booted virtual machine instead has most of its memory
never touched, and its hypervisor backs such a page only on first use: on this machine
256 MiB written (1 MiB writes) into recycled pages took 0.06 s, into untouched ones
0.53-0.94 s, all of it in the copy into the cache (``copy_folio_from_iter_atomic``). Pushes
that keep their blobs grow the cache into untouched memory round after round, so the
push rows sank from round to round while the disk limit (whose file is deleted each
time) measured recycled pages. Dropping the clean cache before each measured push puts
every server's write, and the limit's, on recycled pages.
"""

from __future__ import annotations

import os
from pathlib import Path

_DROP = Path("/proc/sys/vm/drop_caches")


def recycle() -> bool:
    """Write dirty pages back and drop the clean ones from the cache (root only), so the
    next writes fill recycled pages. False when it could not drop them."""
    os.sync()
    try:
        _DROP.write_text("1\n")
    except OSError:
        return False
    return True


def warm(path: Path, chunk: int = 1 << 20) -> None:
    """Read ``path`` into the cache again (a client's data after ``recycle``), so the
    client does not read it from the disk while it is measured."""
    with path.open("rb") as f:
        while f.read(chunk):
            pass


def note(dropped: bool) -> str:
    """What a result's machine notes say about it."""
    return "clean pages dropped" if dropped else "not dropped (not root)"
