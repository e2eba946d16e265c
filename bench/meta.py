"""What every saved result records about its run: when, which commit, which machine."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Saved results, one JSON file per section; the docs' tables are generated from them.
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit(paths: tuple[str, ...], root: Path = REPO_ROOT) -> str:
    """The commit of ``root`` the measured code comes from: HEAD's short hash, marked
    when tracked files under ``paths`` differ from it (others may be editing the tree
    while a bench runs: the mark says the figures are not exactly HEAD's)."""
    head = _git(root, "rev-parse", "--short=10", "HEAD") or "unknown"
    # Saved results are not the measured code (a run of several sections writes them).
    dirty = _git(
        root, "status", "--porcelain", "--untracked-files=no", "--", *paths, ":!bench/results"
    )
    if not dirty:
        return head
    # Name the paths that differ, not every path measured.
    changed = sorted({p for p in paths for line in dirty.splitlines() if p in line[3:]})
    return f"{head} + uncommitted changes in {', '.join(changed or paths)}"


def first_line(argv: list[str]) -> str:
    """The first line a tool prints about its version ("?" when it cannot be run)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def _filesystem(path: Path) -> str:
    best, fs = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, fs = mount, f"{kind} on {device}"
    except OSError:
        pass
    return fs


def machine(workdir: Path) -> dict[str, str]:
    notes: dict[str, str] = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln),
            "?",
        )
    except OSError:
        model = "?"
    notes["cpu"] = f"{os.cpu_count()} x {model}"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        notes["memory"] = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    notes["kernel"] = platform.release()
    notes["storage"] = _filesystem(workdir)
    notes["python"] = platform.python_version()
    return notes


@contextlib.contextmanager
def scratch(section: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A section's scratch directory (under ``parent``, or the system's temporary
    directory), removed when the section is done unless ``keep`` (``--keep``)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"berth-bench-{section}-", dir=parent))
    try:
        yield workdir
    finally:
        if keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def load() -> float:
    """The 1-minute load average: on a shared machine it tells how much to trust a run."""
    return os.getloadavg()[0]


def envelope(
    section: str,
    paths: tuple[str, ...],
    started: float,
    load_before: float,
    machine: Mapping[str, str],
) -> dict[str, Any]:
    """What every saved section says about its run, beside its figures: ``paths`` hold
    the code measured, ``started`` is the section's start (monotonic), ``machine`` what
    `machine()` told while the work directory still existed."""
    return {
        "section": section,
        "date": now(),
        "commit": commit(paths),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": {
            **machine,
            "load average (1 min) before / after": f"{load_before:.1f} / {load():.1f}",
        },
    }
