"""`python -m bench --quick --only operator,replication`: both sections end to end, tiny.

Real processes: the control plane and the operator, four Berth servers and skopeo.
Checks that each section saves a result with every figure the docs need, and that the
docs' sections are generated from it while the rest of each doc is kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import REPO_ROOT, require_tool

pytestmark = pytest.mark.integration


def test_quick_operator_and_replication_sections(tmp_path: Path) -> None:
    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "skopeo"):
        require_tool(tool)
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    for name in ("operator", "replication"):
        (docs / f"{name}.md").write_text(
            f"# Kept\n\n<!-- bench:{name}:start -->\nold\n<!-- bench:{name}:end -->\n\nkept\n"
        )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "operator,replication",
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
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]

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
