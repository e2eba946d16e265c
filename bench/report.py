"""Results as a text table (stdout), a markdown section (docs/benchmarks.md) and JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RATIO_NOTE = (
    "Each value is the best of its repetitions (all samples are in the JSON). ratio:"
    " Berth / distribution when higher is better, distribution / Berth when lower is"
    " better, so ratio >= 1.0 means Berth is at or ahead on that row"
)
PHASE_NOTE = (
    "Server CPU seconds per phase (median of the repetitions; request phases also per request)"
    " and peak RSS (VmHWM summed over the server's processes, max of the repetitions):"
)
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


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
        f"Berth vs CNCF distribution — {report.date} ({report.duration_s:.0f} s run)",
        _machine_line(report),
        RATIO_NOTE + " (* marks rows below 1.0; ↑ higher is better, ↓ lower is better)",
        "",
        _text(*_main_table(report)),
        "",
        _text(*_limits_table(report)),
        "",
        PHASE_NOTE,
        _text(*_phase_table(report)),
    ]
    return "\n".join(parts) + "\n"


def markdown(report: Report) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    parts = [
        START,
        f"Run of {report.date} ({report.duration_s:.0f} s), generated by `make bench`.",
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
        END,
    ]
    return "\n".join(parts) + "\n"


DOC_TEMPLATE = """# Benchmarks

`make bench` (`python -m bench`) runs Berth's registry server and CNCF distribution 2.8
on this machine, in one run, with the same load, and measures the machine's own limits
in the same run. The section between the markers below is rewritten by every run; the
rest of this file is kept.

{results}
"""


def write_markdown(path: Path, report: Report) -> None:
    section = markdown(report)
    try:
        current = path.read_text()
    except FileNotFoundError:
        current = ""
    if START in current and END in current:
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END) + "\n?", re.DOTALL)
        updated = pattern.sub(lambda _: section, current, count=1)
    else:
        updated = DOC_TEMPLATE.format(results=section)
    path.write_text(updated)
