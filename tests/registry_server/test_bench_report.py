"""bench.report: ratio direction, best-of values, the markdown and the saved JSON."""

from __future__ import annotations

from bench import cli, report


def _report(rows: list[report.Row]) -> report.Report:
    return report.Report(
        date="2026-01-01 00:00 UTC",
        machine={"cpu": "2 x test"},
        settings={"reps": 3},
        ours="berth",
        theirs="distribution",
        columns=["berth", "distribution"],
        rows=rows,
        limits=[report.Limit("sha256", "hashlib sha256", "MB/s", 1500.0)],
        phases=[
            {
                "key": "push",
                "label": "push",
                "servers": {
                    "berth": {"cpu_s": 1.0, "peak_rss_mib": 50.0},
                    "distribution": {"cpu_s": 2.0, "peak_rss_mib": 30.0},
                },
            }
        ],
    )


def test_ratio_is_at_least_one_when_berth_is_ahead_either_way() -> None:
    faster = report.Row("a", "a", "MB/s", True, {"berth": 200.0, "distribution": 100.0})
    lower_latency = report.Row("b", "b", "ms", False, {"berth": 5.0, "distribution": 10.0})
    more_memory = report.Row("c", "c", "MiB", False, {"berth": 60.0, "distribution": 30.0})
    assert faster.ratio("berth", "distribution") == 2.0
    assert lower_latency.ratio("berth", "distribution") == 2.0
    assert more_memory.ratio("berth", "distribution") == 0.5
    assert report.Row("d", "d", "x", True, {"berth": 1.0}).ratio("berth", "distribution") is None


def test_text_marks_rows_below_one() -> None:
    rows = [
        report.Row("a", "push", "MB/s", True, {"berth": 200.0, "distribution": 100.0}),
        report.Row("c", "rss", "MiB", False, {"berth": 60.0, "distribution": 30.0}),
    ]
    out = report.text(_report(rows))
    assert "2.00" in out
    assert "0.50 *" in out
    assert "hashlib sha256" in out


def test_markdown_names_the_run_and_survives_json() -> None:
    rows = [report.Row("a", "push", "MB/s", True, {"berth": 2.0, "distribution": 1.0})]
    result = _report(rows)
    result.commit = "abc1234"
    text = report.markdown(result)
    assert "Run of 2026-01-01 00:00 UTC, commit abc1234" in text
    assert "| push | MB/s ↑ | 2.00 | 1.00 | 2.00 |" in text
    assert report.markdown(report.Report.from_json(result.to_json())) == text


def test_percentile_and_rates() -> None:
    assert cli._percentile(list(range(1, 101)), 99) == 99
    assert cli._percentile([7], 99) == 7
    results = [
        {"start": 10.0, "end": 12.0, "bytes": 2_000_000, "count": 10},
        {"start": 10.5, "end": 14.0, "bytes": 2_000_000, "count": 30},
    ]
    assert cli.throughput(results) == 1.0  # 4 MB over the 4 s both processes spanned
    assert cli.rate(results) == 10.0


def test_phase_dependencies_are_added_in_order() -> None:
    assert cli._with_deps(["catalog"]) == ["populate_tags", "populate_repos", "catalog"]
    assert cli._with_deps(["pull_large", "push_small"]) == [
        "push_large",
        "push_small",
        "pull_large",
    ]
