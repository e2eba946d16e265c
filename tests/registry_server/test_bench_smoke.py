"""`python -m bench --quick`: the whole benchmark harness end to end, with tiny sizes.

Real processes: our server, CNCF distribution and nginx. Checks that every row gets a
value for both servers, the limits are measured, and the saved result and the docs'
sections generated from it are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import run_quick
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

ROWS = {
    "push_large",
    "push_small",
    "pull_large",
    "pull_small",
    "populate_tags",
    "populate_repos",
    "manifest_get",
    "manifest_get_p99",
    "manifest_head",
    "manifest_head_p99",
    "tag_list",
    "tag_list_p99",
    "catalog",
    "catalog_p99",
    "catalog_page",
    "catalog_page_p99",
    "cpu_total",
    "peak_rss",
}
# Rows of Berth alone (distribution has no web UI).
BERTH_ONLY = {"ui_pages", "ui_pages_p99"}


def test_quick_bench_fills_every_row(tmp_path: Path) -> None:
    registry = require_tool("docker-registry")
    nginx = require_tool("nginx")
    results = tmp_path / "results"
    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "benchmarks.md"
    doc.write_text(
        "# Notes kept\n\n"
        + "".join(
            f"<!-- bench:{name}:start -->\nold\n<!-- bench:{name}:end -->\n"
            for name in ("sections", "server", "server-analysis")
        )
    )
    run = run_quick(
        "server", tmp_path, "--distribution-bin", str(registry), "--nginx-bin", str(nginx)
    )
    assert "ratio berth/distribution" in run.stdout

    report = json.loads((results / "server.json").read_text())
    assert report["columns"] == ["berth", "distribution"]
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == ROWS | BERTH_ONLY
    for row in rows.values():
        for column in ("berth", "distribution"):
            if column == "berth" or row["key"] not in BERTH_ONLY:
                assert row["values"][column] > 0, (row["key"], column)
    # The pushes write into recycled pages, as the disk limit does.
    assert report["machine"]["page cache before each push"] == "the stored blobs' pages dropped"
    assert {limit["key"] for limit in report["limits"]} == {"sha256", "disk_write", "nginx"}
    assert all(limit["value"] > 0 for limit in report["limits"])
    for phase in report["phases"]:
        for usage in phase["servers"].values():
            assert usage["cpu_s"] >= 0
            assert usage["peak_rss_mib"] > 0

    text = doc.read_text()
    assert text.startswith("# Notes kept\n")
    assert "\nold\n" not in text
    assert "| blob push, 1 x 4 MiB (POST+PUT) |" in text
    # The scratch directory (storage of all three servers) is removed.
    assert not list(tmp_path.glob("berth-bench-*"))
