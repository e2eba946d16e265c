"""Running a `make bench` section end to end, tiny (`--quick`), for the smoke tests:
results and docs go to a temporary directory, never to bench/results/ or docs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .tools import REPO_ROOT


def marked_doc(path: Path, *sections: str) -> None:
    """A doc holding each section's markers around stale text, and text to keep."""
    markers = "".join(
        f"<!-- bench:{name}:start -->\nold\n<!-- bench:{name}:end -->\n\n" for name in sections
    )
    path.write_text(f"# Kept\n\n{markers}kept\n")


def run_quick(
    sections: str, workdir: Path, *extra: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m bench --quick --only <sections>` writing its results to
    `workdir/results` and its docs to `workdir/docs`; fails the test if it fails."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            sections,
            "--results",
            str(workdir / "results"),
            "--docs-dir",
            str(workdir / "docs"),
            "--workdir",
            str(workdir),
            *extra,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run
