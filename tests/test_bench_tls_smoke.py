"""`python -m bench --quick --only tls`: the section end to end, tiny.

Real processes: a plain and a TLS Berth server, a node proxy in front of each, curl.
Checks that the section saves every row the docs need and that its docs section is
generated from it while the rest of the doc is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import marked_doc, run_quick
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration


def test_quick_tls_section(tmp_path: Path) -> None:
    require_tool("curl")
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    marked_doc(docs / "benchmarks.md", "sections", "tls")
    run_quick("tls", tmp_path)

    result = json.loads((results / "tls.json").read_text())
    assert result["section"] == "tls" and result["commit"]
    rows = result["rows"]
    assert [(r["case"], r["streams"]) for r in rows] == [
        (case, streams)
        for streams in (1, result["settings"]["streams"])
        for case in ("plain", "tls", "plain+relay", "tls+relay")
    ]
    for row in rows:
        assert row["mib_s"] > 0 and row["total_mib_s"] > 0 and row["cpu_s_per_gib"] >= 0
        assert (row["relay_cpu_s_per_gib"] is None) == ("relay" not in row["case"])

    text = (docs / "benchmarks.md").read_text()
    assert "\nold\n" not in text and text.startswith("# Kept\n") and text.endswith("\nkept\n")
    assert "| tls+relay | 2 |" in text
    assert not list(tmp_path.glob("berth-bench-*"))
