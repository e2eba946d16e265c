"""`python -m bench --quick --only pull-through`: the section end to end, tiny.

Real processes: distribution as the upstream and in proxy mode, two Berth servers and
skopeo. Checks that the section saves every figure the docs need and that its docs
section is generated from it while the rest of the doc is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import marked_doc, run_quick
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration


def test_quick_pull_through_section(tmp_path: Path) -> None:
    for tool in ("skopeo", "docker-registry"):
        require_tool(tool)
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    marked_doc(docs / "pull-through-cache.md", "pull-through")
    run_quick("pull-through", tmp_path)

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
