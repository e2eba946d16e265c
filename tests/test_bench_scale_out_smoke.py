"""`python -m bench --quick --only scale-out`: the section end to end, tiny.

Real processes: SeaweedFS, PostgreSQL, two Berth replicas behind nginx, Berth on the
filesystem and distribution 2.8 on the same bucket. Checks that the section saves a
result with every row and goal the docs need, that its docs section is generated from
it while the rest of the doc is kept, and that the scratch directory is gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import scale_out
from tests.support.bench_runs import marked_doc, run_quick
from tests.support.tools import in_ci

pytestmark = pytest.mark.integration


def test_quick_scale_out_section(tmp_path: Path) -> None:
    missing = scale_out.missing_tools()
    if missing:
        message = f"{', '.join(missing)} missing; run `make tools`"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    marked_doc(docs / "benchmarks.md", "sections", "scale-out")
    run_quick("scale-out", tmp_path)

    result = json.loads((results / "scale_out.json").read_text())
    assert result["section"] == "scale-out" and result["commit"]
    keys = {row["key"] for row in result["rows"]}
    assert {"push_large", "pull_small", "manifest_get", "tag_list", "catalog"} <= keys
    registries = set(scale_out.COLUMNS) - {scale_out.STORE}
    for row in result["rows"]:
        # The store itself is measured in the blob rows only.
        wanted = set(scale_out.COLUMNS) if row["key"] in scale_out.BLOB_ROWS else registries
        assert set(row["values"]) == wanted, row["key"]
        assert all(v is not None and v > 0 for v in row["values"].values()), row["key"]
    goals = {goal["key"]: goal for goal in result["goals"]}
    assert set(goals) == {*scale_out.BLOB_ROWS, "tag_list", "catalog"}
    for key in scale_out.BLOB_ROWS:
        assert all(r is not None and r > 0 for r in goals[key]["of_store"].values()), key
    # Every phase of a registry on the store has the store's CPU beside its own.
    for phase in result["phases"]:
        for name in scale_out.BERTH_S3:
            assert phase["servers"][name]["store_cpu_s"] >= 0, phase["key"]
    # Both replicas answered through the balancer.
    spread = result["requests_per_replica_of_two"]
    assert len(spread) == 2 and min(spread.values()) > 0, spread

    text = (docs / "benchmarks.md").read_text()
    assert "\nold\n" not in text and text.startswith("# Kept\n") and text.endswith("\nkept\n")
    assert "distribution, S3" in text and "≥ 20 x" in text
    assert "SeaweedFS direct is the store alone" in text
    assert "`bench/results/scale_out.json`" in text  # the sections table
    assert not list(tmp_path.glob("berth-bench-*"))
