"""`python -m bench --quick --only clients`: the section end to end, tiny.

Real processes: Berth and CNCF distribution 2.8, pushed to and pulled from by curl,
crane and the Python harness. Checks that every cell is measured and that the docs
section is generated from the saved result while the rest of the doc is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import marked_doc, run_quick
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration


def test_quick_clients_section(tmp_path: Path) -> None:
    require_tool("curl")
    require_tool("crane")
    registry = require_tool("docker-registry")
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    marked_doc(docs / "benchmarks.md", "sections", "clients")
    run_quick("clients", tmp_path, "--distribution-bin", str(registry))

    result = json.loads((results / "clients.json").read_text())
    assert result["section"] == "clients" and result["commit"]
    cells = {(c["server"], c["client"], c["case"]): c for c in result["cells"]}
    assert set(cells) == {
        (server, client, case)
        for server in ("berth", "distribution")
        for client in ("curl", "crane", "python")
        for case in ("push_large", "push_small", "pull_large", "pull_small")
    }
    for cell in cells.values():
        assert min(cell["mb_s"]) > 0 and min(cell["cpu_s"]) >= 0 and min(cell["blkio_s"]) >= 0

    text = (docs / "benchmarks.md").read_text()
    # Each push writes into recycled pages, and the docs say so.
    assert result["machine"]["page cache before each push"] == "the stored blobs' pages dropped"
    assert "every push writes into recycled pages" in text
    assert "\nold\n" not in text and text.startswith("# Kept\n") and text.endswith("\nkept\n")
    assert "| push 4 x 1 MiB | crane |" in text
    assert not list(tmp_path.glob("berth-bench-*"))
