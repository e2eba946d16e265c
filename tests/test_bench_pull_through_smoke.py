"""`python -m bench --quick --only pull-through`: the section end to end, tiny.

Real processes: distribution as the upstream and in proxy mode, two Berth servers and
skopeo. Checks that the section saves every figure the docs need and that its docs
section is generated from it while the rest of the doc is kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import REPO_ROOT, require_tool

pytestmark = pytest.mark.integration


def test_quick_pull_through_section(tmp_path: Path) -> None:
    for tool in ("skopeo", "docker-registry"):
        require_tool(tool)
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    marker = "pull-through"
    (docs / "pull-through-cache.md").write_text(
        f"# Kept\n\n<!-- bench:{marker}:start -->\nold\n<!-- bench:{marker}:end -->\n\nkept\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "pull-through",
            "--results",
            str(results),
            "--docs-dir",
            str(docs),
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    result = json.loads((results / "pull_through.json").read_text())
    assert result["section"] == "pull-through" and result["commit"]
    assert {i["key"] for i in result["images"]} == set(result["pulls"])
    for by_path in result["pulls"].values():
        for summary in by_path.values():
            assert len(summary["samples_s"]) == result["settings"]["reps"]
            assert summary["median_s"] > 0
    assert result["limits"]["sha256_mb_s"] and result["limits"]["disk_write_fsync_mb_s"]

    text = (docs / "pull-through-cache.md").read_text()
    assert "\nold\n" not in text and text.startswith("# Kept\n") and text.endswith("\nkept\n")
    assert "Berth cache, first pull" in text and "Goals met:" in text
    assert not list(tmp_path.glob("berth-bench-*"))
