"""The machine's own limits, measured in the same run: hashing, disk, the data file, and
the memory a Python server starts from."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CHUNK = 1 << 20


def make_data_file(path: Path, size: int) -> None:
    """Random bytes, written once, in 1 MiB pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for pos in range(0, size, CHUNK):
            f.write(os.urandom(min(CHUNK, size - pos)))
    # World-readable, so an nginx worker running as another user can serve it.
    path.chmod(0o644)


def sha256_mbps(data: Path, total: int) -> float:
    """hashlib sha256 over ``total`` bytes in 1 MiB updates (data in memory: hash cost only)."""
    with data.open("rb") as f:
        block = f.read(min(16 * CHUNK, total))
    view = memoryview(block)
    hasher = hashlib.sha256()
    done = 0
    start = time.perf_counter()
    while done < total:
        for pos in range(0, len(view), CHUNK):
            piece = view[pos : pos + CHUNK][: total - done]
            hasher.update(piece)
            done += len(piece)
            if done >= total:
                break
    hasher.hexdigest()
    return total / (time.perf_counter() - start) / 1e6


def disk_write_mbps(data: Path, target: Path, total: int) -> float:
    """Like `dd bs=1M conv=fsync`: write ``total`` bytes of random data, fsync, close."""
    with data.open("rb") as f:
        block = f.read(CHUNK)
    start = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < total:
            done += os.write(fd, block[: total - done])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    target.unlink()
    return total / elapsed / 1e6


# What a Python server's memory starts from: the interpreter, the libraries, our code.
FLOOR_STEPS = (
    ("the interpreter alone", ""),
    ("+ uvloop and aiohttp's server", "import uvloop, aiohttp.web"),
    ("+ registry_server.app", "import uvloop, aiohttp.web, registry_server.app"),
)


def python_floor() -> list[tuple[str, float]]:
    """VmRSS (MiB) of a fresh interpreter after each step's imports."""
    floor = []
    for label, imports in FLOOR_STEPS:
        code = (
            f"{imports}\nimport pathlib\n"
            "print(next(ln.split()[1] for ln in pathlib.Path('/proc/self/status')"
            ".read_text().splitlines() if ln.startswith('VmRSS:')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        floor.append((label, int(out.stdout.strip()) / 1024))
    return floor
