"""`python -m bench --quick --only operator,replication`: both sections end to end, tiny.

Real processes: the control plane and the operator, four Berth servers and skopeo.
Checks that each section saves a result with every figure the docs need, and that the
docs' sections are generated from it while the rest of each doc is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import marked_doc, run_quick
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration


def test_quick_operator_and_replication_sections(tmp_path: Path) -> None:
    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "skopeo"):
        require_tool(tool)
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    for name in ("operator", "replication"):
        marked_doc(docs / f"{name}.md", name)
    run_quick("operator,replication", tmp_path, timeout=900)

    operator = json.loads((results / "operator.json").read_text())
    assert operator["section"] == "operator" and operator["commit"]
    assert operator["apply"]["to_children"]["median_s"] > 0
    assert any(c.startswith("Deployment") for c in operator["apply"]["children"])
    assert operator["fan_out"]["repository_to_secrets_s"] > 0
    assert operator["repositories"]["rss_peak_mib"] >= operator["repositories"]["rss_before_mib"]

    replication = json.loads((results / "replication.json").read_text())
    small = replication["small"]
    assert len(small["replication_ms"]) == len(small["skopeo_ms"]) == small["images"]
    assert all(s > 0 for s in small["skopeo_startup_ms"])
    assert replication["big"]["replication_mb_s"] > 0 and replication["big"]["skopeo_mb_s"] > 0

    for name, expected in (("operator", "children present"), ("replication", "push done")):
        text = (docs / f"{name}.md").read_text()
        assert "\nold\n" not in text and text.startswith("# Kept\n") and text.endswith("\nkept\n")
        assert expected in text
    assert not list(tmp_path.glob("berth-bench-*"))
