"""The docs' measured figures are generated from the saved bench results, and match.

bench/docs.py rewrites what lies between `<!-- bench:<name>:start/end -->` markers in
docs/benchmarks.md, docs/operator.md and docs/replication.md from bench/results/*.json.
These tests check that the generation depends on nothing but the saved results (the
same bytes every time, whatever the JSON's layout), that the docs in the repository are
what the saved results generate (the drift check `berth_dev.generate --check` runs
too), and that every marked section has a saved result to come from.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import analysis, docs, meta, report


def _results() -> dict[str, dict[str, Any]]:
    return docs.load_results(meta.RESULTS_DIR)


def _copy_docs(tmp_path: Path) -> Path:
    target = tmp_path / "docs"
    target.mkdir()
    for name in docs.DOCS:
        shutil.copy(docs.DOCS_DIR / name, target / name)
    return target


def test_every_section_has_a_saved_result() -> None:
    results = _results()
    assert set(results) == set(docs.SECTIONS)
    for name, result in results.items():
        assert result["section"] == name
        # Which run a table comes from is part of the saved result and of the doc.
        assert result["date"] and result["commit"] and result["duration_s"] > 0


def test_the_docs_match_what_the_saved_results_generate() -> None:
    outputs = docs.outputs()
    assert set(outputs) == {docs.DOCS_DIR / name for name in docs.DOCS}
    stale = [path.name for path, content in outputs.items() if path.read_bytes() != content]
    assert not stale, (
        f"{stale} differ from what bench/results/ generates:"
        " run `python -m berth_dev.generate bench` (or `make bench`) and commit"
    )


def test_no_marked_section_is_left_empty() -> None:
    for name in docs.DOCS:
        text = (docs.DOCS_DIR / name).read_text()
        markers = re.findall(
            r"<!-- bench:([a-z-]+):start -->\n(.*?)<!-- bench:\1:end -->", text, re.S
        )
        assert markers, name
        for marker, body in markers:
            assert body.strip(), f"{name}: the {marker} section is empty"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    """Twice from the same results, and from the same results saved with another layout
    (key order, indentation): the same bytes."""
    first = docs.outputs(meta.RESULTS_DIR, docs.DOCS_DIR)
    assert docs.outputs(meta.RESULTS_DIR, docs.DOCS_DIR) == first

    shuffled = tmp_path / "results"
    shuffled.mkdir()
    for name, result in _results().items():
        reordered = dict(reversed(list(result.items())))
        (shuffled / docs.result_file(name)).write_text(json.dumps(reordered, indent=None))
    again = docs.outputs(shuffled, docs.DOCS_DIR)
    assert {p.name: c for p, c in again.items()} == {p.name: c for p, c in first.items()}


def test_writing_then_regenerating_changes_nothing(tmp_path: Path) -> None:
    target = _copy_docs(tmp_path)
    docs.write(meta.RESULTS_DIR, target)
    written = {name: (target / name).read_bytes() for name in docs.DOCS}
    assert docs.write(meta.RESULTS_DIR, target) == []
    assert {name: (target / name).read_bytes() for name in docs.DOCS} == written


def test_only_the_marked_sections_change(tmp_path: Path) -> None:
    target = _copy_docs(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    operator = copy.deepcopy(_results()["operator"])
    operator["apply"]["to_children"]["median_s"] = 123.456
    (results / "operator.json").write_text(json.dumps(operator))
    before = (target / "operator.md").read_text()
    docs.write(results, target)
    after = (target / "operator.md").read_text()
    assert "123.5 s" in after and "123.5 s" not in before

    def outside(text: str) -> str:
        return re.sub(
            r"<!-- bench:operator:start -->.*<!-- bench:operator:end -->", "", text, flags=re.S
        )

    assert outside(after) == outside(before)
    # Docs whose sections have no result here are left as they were.
    assert (target / "replication.md").read_bytes() == (
        docs.DOCS_DIR / "replication.md"
    ).read_bytes()


def test_replace_section_needs_exactly_one_pair_of_markers() -> None:
    start, end = docs.start_marker("x"), docs.end_marker("x")
    text = f"# Title\n\n{start}\nold\n{end}\n\nkept\n"
    assert docs.replace_section(text, "x", "new") == f"# Title\n\n{start}\nnew\n{end}\n\nkept\n"
    with pytest.raises(docs.DocsError):
        docs.replace_section("no markers\n", "x", "new")
    with pytest.raises(docs.DocsError):
        docs.replace_section(text + text, "x", "new")


def test_the_analysis_is_computed_from_the_result() -> None:
    """The prose quotes the result it is generated with: change a figure, and the text
    follows, comparisons included."""
    server = report.Report.from_json(json.dumps(_results()["server"]))
    text = analysis.server(server)
    pull = server.row("pull_large")
    assert report.fmt(pull.values[server.ours]) in text

    slower = copy.deepcopy(server)
    nginx = slower.limit("nginx")
    assert nginx is not None
    slower.row("pull_large").values[slower.ours] = nginx.value / 2
    changed = analysis.server(slower)
    assert report.fmt(nginx.value / 2) in changed and "below nginx" in changed

    behind = copy.deepcopy(server)
    row = behind.row("tag_list")
    row.values[behind.ours] = (row.values[behind.theirs] or 1.0) / 2
    # The rows Berth is behind on, in one sentence (the saved run may have others).
    sentence = analysis.server(behind).split(f"behind {behind.theirs} on: ", 1)[1]
    assert f"{row.label} (0.50)" in sentence.split("\n", 1)[0]
    assert f"{row.label} (" not in analysis.server(server)
