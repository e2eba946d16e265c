"""The server section's results: a text table (stdout), JSON (the saved result) and the
markdown that bench.docs puts into docs/benchmarks.md."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

RATIO_NOTE = (
    "Each value is the best of its repetitions (all samples are in the JSON). ratio:"
    " Berth / distribution when higher is better, distribution / Berth when lower is"
    " better, so ratio >= 1.0 means Berth is at or ahead on that row"
)
PHASE_NOTE = (
    "Server CPU seconds per phase (median of the repetitions; request phases also per request)"
    " and peak RSS (VmHWM summed over the server's processes, max of the repetitions):"
)


@dataclass
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None]
    samples: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, ours: str, theirs: str) -> float | None:
        a, b = self.values.get(ours), self.values.get(theirs)
        if a is None or b is None or a <= 0 or b <= 0:
            return None
        return a / b if self.higher_is_better else b / a


@dataclass
class Limit:
    key: str
    label: str
    unit: str
    value: float
    samples: list[float] = field(default_factory=list)


@dataclass
class Report:
    date: str
    machine: dict[str, str]
    settings: dict[str, Any]
    ours: str
    theirs: str
    columns: list[str]
    rows: list[Row]
    limits: list[Limit]
    phases: list[dict[str, Any]]
    duration_s: float = 0.0
    commit: str = ""
    # Memory of a fresh interpreter after importing the server's stack, step by step.
    floor: list[Limit] = field(default_factory=list)
    section: str = "server"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        data["rows"] = [Row(**row) for row in data["rows"]]
        data["limits"] = [Limit(**limit) for limit in data["limits"]]
        data["floor"] = [Limit(**limit) for limit in data.get("floor", [])]
        return cls(**data)

    def row(self, key: str) -> Row:
        return _by_key(self.rows, key, lambda row: row.key)

    def limit(self, key: str) -> Limit | None:
        return next((limit for limit in self.limits if limit.key == key), None)

    def phase(self, key: str) -> dict[str, Any]:
        return _by_key(self.phases, key, lambda phase: str(phase["key"]))


T = TypeVar("T")


def _by_key(items: Sequence[T], key: str, key_of: Callable[[T], str]) -> T:
    for item in items:
        if key_of(item) == key:
            return item
    raise KeyError(f"the result has no {key!r}")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio_cell(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + ("" if ratio >= 1.0 else " *")


def _main_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "unit", *report.columns, f"ratio {report.ours}/{report.theirs}"]
    body = []
    for row in report.rows:
        cells = [row.label, row.unit + (" ↑" if row.higher_is_better else " ↓")]
        cells += [fmt(row.values.get(c)) for c in report.columns]
        cells.append(_ratio_cell(row.ratio(report.ours, report.theirs)))
        body.append(cells)
    return header, body


def _limits_table(report: Report) -> tuple[list[str], list[list[str]]]:
    return ["physical limit (same run)", "unit", "value"], [
        [limit.label, limit.unit, fmt(limit.value)] for limit in report.limits
    ]


def _phase_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["phase"]
    for c in report.columns:
        header += [f"{c} CPU s", f"{c} peak RSS MiB"]
    body = []
    for phase in report.phases:
        if not any(c in phase["servers"] for c in report.columns):
            continue
        cells = [str(phase["label"])]
        for c in report.columns:
            usage = phase["servers"].get(c)
            if usage is None:
                cells += ["-", "-"]
            else:
                cpu = f"{usage['cpu_s']:.2f}"
                if usage.get("cpu_ms_per_request"):
                    cpu += f" ({usage['cpu_ms_per_request']:.2f} ms/req)"
                cells += [cpu, fmt(usage["peak_rss_mib"])]
        body.append(cells)
    return header, body


def _text(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def _machine_line(report: Report) -> str:
    return "; ".join(f"{k}: {v}" for k, v in report.machine.items())


def text(report: Report) -> str:
    parts = [
        f"Berth vs CNCF distribution — {report.date}, {report.commit} ({report.duration_s:.0f} s)",
        _machine_line(report),
        RATIO_NOTE + " (* marks rows below 1.0; ↑ higher is better, ↓ lower is better)",
        "",
        _text(*_main_table(report)),
        "",
        _text(*_limits_table(report)),
        "",
        PHASE_NOTE,
        _text(*_phase_table(report)),
        "",
        _text(
            ["a fresh Python process", "unit", "RSS"],
            [[f.label, f.unit, fmt(f.value)] for f in report.floor],
        ),
    ]
    return "\n".join(parts) + "\n"


def run_line(report: Report) -> str:
    return (
        f"Run of {report.date}, commit {report.commit or 'unknown'},"
        f' {report.duration_s:.0f} s (`make bench BENCH_ARGS="--only server"`).'
    )


def saved_run_header(result: Mapping[str, Any], section: str, saved: str) -> list[str]:
    """The lines that open a saved section's docs: the run (date, commit, time, how to
    rerun it, where it is saved), the machine and tool versions, and the run's note."""
    machine = "; ".join(f"{k}: {v}" for k, v in result["machine"].items())
    versions = "; ".join(f"{k}: {v}" for k, v in result["versions"].items())
    parts = [
        f"Run of {result['date']}, commit {result['commit']}, {result['duration_s']:.0f} s"
        f' (`make bench BENCH_ARGS="--only {section}"`), saved in `bench/results/{saved}`.',
        "",
        f"Machine: {machine}. {versions}.",
        "",
    ]
    if result.get("note"):
        parts += [f"Note on this run: {result['note']}", ""]
    return parts


def markdown(report: Report) -> str:
    """The results section of docs/benchmarks.md (bench.docs puts it between markers)."""
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    parts = [
        run_line(report),
        "",
        f"Machine: {_machine_line(report)}.",
        "",
        f"Settings: {settings}.",
        "",
        f"{RATIO_NOTE}; rows below 1.0 are marked `*`. ↑ higher is better, ↓ lower is better.",
        "",
        _markdown(*_main_table(report)),
        "",
        _markdown(*_limits_table(report)),
        "",
        PHASE_NOTE,
        "",
        _markdown(*_phase_table(report)),
    ]
    if report.floor:
        parts += [
            "",
            _markdown(
                ["a fresh Python process (same run)", "unit", "RSS"],
                [[f.label, f.unit, fmt(f.value)] for f in report.floor],
            ),
        ]
    return "\n".join(parts) + "\n"
