"""The docs' figures, generated from the saved results in bench/results/.

Each figure in docs/benchmarks.md, docs/operator.md and docs/replication.md that a
bench measured sits between a pair of markers,

    <!-- bench:<name>:start --> ... <!-- bench:<name>:end -->

and is rewritten from one saved result (`bench/results/<section>.json`) by
`python -m bench` after a run, or by `python -m berth_dev.generate bench` from the
results as they are; `--check` there (and tests/test_bench_docs.py) fails when a doc
differs from what its result generates. Text outside the markers is written by hand
and holds no measured figure. The output depends on nothing but the saved results, so
generating twice gives the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench import meta, report

DOCS_DIR = meta.REPO_ROOT / "docs"
Result = dict[str, Any]


class DocsError(RuntimeError):
    """A doc lacks the markers of a section it should hold, or a result is unreadable."""


def start_marker(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``body``."""
    start, end = start_marker(name), end_marker(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise DocsError(f"needs exactly one pair of markers {start} ... {end}")
    content = body if body.endswith("\n") else body + "\n"
    return pattern.sub(lambda _: f"{start}\n{content}{end}", text, count=1)


# --- formatting ---------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def millis(value: float) -> str:
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def mib(value: float) -> str:
    return f"{value:.0f} MiB" if value >= 100 else f"{value:.1f} MiB"


def count(value: int) -> str:
    return f"{value:,}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_line(result: Result, how: str) -> str:
    machine = "; ".join(f"{k}: {v}" for k, v in result["machine"].items())
    return (
        f"Run of {result['date']}, commit {result['commit']}, {result['duration_s']:.0f} s"
        f" (`{how}`), saved in `bench/results/{result['section']}.json`. Machine: {machine}."
    )


# --- operator -----------------------------------------------------------------------------


def operator_section(result: Result) -> str:
    apply, fan, repos = result["apply"], result["fan_out"], result["repositories"]
    n = fan["namespaces"]
    which = "the default" if n == 100 else f"`--namespaces {n}` or `BENCH_FANOUT_NAMESPACES={n}`"
    children = ", ".join(f"`{c}`" for c in apply["children"])
    singles = fan["single_namespace"]

    def row(label: str, s: Mapping[str, Any]) -> list[str]:
        return [label, seconds(s["median_s"]), seconds(s["min_s"]), seconds(s["max_s"])]

    parts = [
        run_line(result, 'make bench BENCH_ARGS="--only operator"'),
        "",
        "### `kubectl apply` to all children present",
        "",
        f"{apply['registries']} Registries with an empty spec (the defaults), applied one"
        " after another, each once the operator was idle again. Timed from the start of"
        f" `kubectl apply` until all {len(apply['children'])} children can be read"
        f" ({children}), and until the Registry's status carries its generation.",
        "",
        _table(
            ["from the start of `kubectl apply`", "median", "min", "max"],
            [
                row(f"all {len(apply['children'])} children present", apply["to_children"]),
                row("status written (`observedGeneration`)", apply["to_status"]),
                row("`kubectl apply` itself returned", apply["kubectl_apply"]),
            ],
        ),
        "",
        f"### Pull Secrets fanned out to {count(n)} namespaces",
        "",
        f'{count(n)} namespaces ({which}; `make bench BENCH_ARGS="--only operator'
        ' --namespaces 1000"` for 1,000) with a label; a Repository selecting them by that'
        " label is applied. Then as many namespaces again are created in one `kubectl apply`"
        " while the Repository exists (the namespace watch), then single ones, one at a time.",
        "",
        _table(
            ["from the start of the `kubectl apply` of", "until", "time"],
            [
                [
                    "the Repository",
                    f"pull Secrets in all {count(n)} namespaces",
                    seconds(fan["repository_to_secrets_s"]),
                ],
                [
                    f"{count(n)} more namespaces, in one apply",
                    "their pull Secrets",
                    f"{seconds(fan['new_namespaces_to_secrets_s'])} (`kubectl apply` itself:"
                    f" {seconds(fan['new_namespaces_kubectl_s'])})",
                ],
                [
                    f"one namespace (median of {len(singles['samples_s'])})",
                    "its pull Secret",
                    f"{seconds(singles['median_s'])} ({seconds(singles['min_s'])} to"
                    f" {seconds(singles['max_s'])})",
                ],
            ],
        ),
        "",
        "### Operator memory",
        "",
        "The operator process's RSS (VmRSS), sampled every 50 ms, as the run went on"
        f" (one operator throughout). The {count(repos['repositories'])} Repositories belong"
        f" to one Registry, each granting one of {repos['namespaces']} namespaces, created"
        f" through the API by four threads in {seconds(repos['create_s'])}; all had a status"
        f" for their generation {seconds(repos['to_all_reconciled_s'])} after the first"
        " was created.",
        "",
        _table(
            ["when", "operator RSS"],
            [
                ["idle after start", mib(result["rss_idle_mib"])],
                [f"after {apply['registries'] + 1} Registries", mib(apply["rss_after_mib"])],
                [
                    f"fan-out to {count(n)} namespaces: before → peak",
                    f"{mib(fan['rss_before_mib'])} → {mib(fan['rss_peak_repository_mib'])}",
                ],
                [
                    f"{count(n)} more namespaces: peak",
                    mib(fan["rss_peak_new_namespaces_mib"]),
                ],
                [
                    f"{count(repos['repositories'])} Repositories: before → peak → after",
                    f"{mib(repos['rss_before_mib'])} → {mib(repos['rss_peak_mib'])} →"
                    f" {mib(repos['rss_after_mib'])}",
                ],
            ],
        ),
    ]
    return "\n".join(parts) + "\n"


# --- replication --------------------------------------------------------------------------


def replication_section(result: Result) -> str:
    small, big = result["small"], result["big"]
    size = f"{big['mib'] // 1024} GiB" if big["mib"] % 1024 == 0 else f"{big['mib']} MiB"
    layer = f"{small['layer_bytes'] // 1024} KiB"
    none = "— (no process starts)"
    rows = [
        [
            f"{small['images']} small images ({layer} layer), push done → pullable, p50",
            millis(small["replication_p50_ms"]),
            millis(small["skopeo_p50_ms"]),
        ],
        [
            "same, p99",
            millis(small["replication_p99_ms"]),
            millis(small["skopeo_p99_ms"]),
        ],
        [
            "same, p50 / p99 without skopeo's start-up (its median subtracted)",
            none,
            f"{millis(small['skopeo_excl_startup_p50_ms'])} /"
            f" {millis(small['skopeo_excl_startup_p99_ms'])}",
        ],
        [
            "skopeo's process start-up alone (to its first connection), p50 / p99",
            none,
            f"{millis(small['skopeo_startup_p50_ms'])} / {millis(small['skopeo_startup_p99_ms'])}",
        ],
        [
            f"one {size} image, push done → pullable",
            f"{seconds(big['replication_s'])}, {big['replication_mb_s']:.0f} MB/s",
            f"{seconds(big['skopeo_s'])}, {big['skopeo_mb_s']:.0f} MB/s"
            f" ({big['skopeo_excl_startup_mb_s']:.0f} MB/s without start-up)",
        ],
    ]
    parts = [
        run_line(result, 'make bench BENCH_ARGS="--only replication"') + f" {result['skopeo']}.",
        "",
        _table(["what", "Berth replication, eu → us", "`skopeo copy`, src → target"], rows),
    ]
    return "\n".join(parts) + "\n"


# --- the sections and their docs ----------------------------------------------------------

Renderer = Callable[[Result], str]


def _server_result(result: Result) -> report.Report:
    return report.Report.from_json(json.dumps(result))


def server_results(result: Result) -> str:
    return report.markdown(_server_result(result))


def server_analysis(result: Result) -> str:
    from bench import analysis

    return analysis.server(_server_result(result))


def scale_out_section(result: Result) -> str:
    from bench import scale_out

    return scale_out.markdown(result)


def pull_through_section(result: Result) -> str:
    from bench import pull_through

    return pull_through.markdown(result)


def tls_section(result: Result) -> str:
    from bench import tls

    return tls.markdown(result)


def clients_section(result: Result) -> str:
    from bench import clients

    return clients.markdown(result)


# doc file name -> [(marker name, section whose saved result it is made from, renderer)]
DOCS: Mapping[str, list[tuple[str, str, Renderer]]] = {
    "benchmarks.md": [
        ("server", "server", server_results),
        ("server-analysis", "server", server_analysis),
        ("scale-out", "scale-out", scale_out_section),
        ("tls", "tls", tls_section),
        ("clients", "clients", clients_section),
    ],
    "operator.md": [("operator", "operator", operator_section)],
    "replication.md": [("replication", "replication", replication_section)],
    "pull-through-cache.md": [("pull-through", "pull-through", pull_through_section)],
}


def sections_table(results: Mapping[str, Result]) -> str:
    """Which run each saved result comes from and how long its section took."""
    rows = [
        [
            f"`{name}`",
            f"`bench/results/{result_file(name)}`",
            str(result["date"]),
            f"`{result['commit']}`",
            seconds(float(result["duration_s"])),
        ]
        for name, result in sorted(results.items())
    ]
    header = ["section", "saved result", "run ended", "commit", "measuring took"]
    return _table(header, rows) + "\n"


# The sections of `python -m bench` whose saved results the docs are generated from;
# other files in bench/results/ (other benches' results) are not read here.
SECTIONS = ("server", "operator", "replication", "scale-out", "pull-through", "tls", "clients")


def result_file(section: str) -> str:
    """The saved result's file name: scale-out -> scale_out.json."""
    return section.replace("-", "_") + ".json"


def load_results(results_dir: Path) -> dict[str, Result]:
    found: dict[str, Result] = {}
    for name in SECTIONS:
        path = results_dir / result_file(name)
        if not path.exists():
            continue
        try:
            found[name] = json.loads(path.read_text())
        except ValueError as err:
            raise DocsError(f"{path}: {err}") from err
    return found


def outputs(results_dir: Path = meta.RESULTS_DIR, docs_dir: Path = DOCS_DIR) -> dict[Path, bytes]:
    """Every doc holding figures, as the saved results make it (docs without a result to
    fill them, or that do not exist, are left out)."""
    results = load_results(results_dir)
    out: dict[Path, bytes] = {}
    for doc, sections in DOCS.items():
        path = docs_dir / doc
        if not path.exists():
            continue
        text = original = path.read_text()
        for marker, section, render in sections:
            if section in results:
                try:
                    text = replace_section(text, marker, render(results[section]))
                except DocsError as err:
                    raise DocsError(f"{path}: {err}") from err
        if doc == "benchmarks.md" and results:
            try:
                text = replace_section(text, "sections", sections_table(results))
            except DocsError as err:
                raise DocsError(f"{path}: {err}") from err
        if text != original or any(s in results for _, s, _ in sections):
            out[path] = text.encode()
    return out


def write(results_dir: Path = meta.RESULTS_DIR, docs_dir: Path = DOCS_DIR) -> list[Path]:
    changed = []
    for path, content in sorted(outputs(results_dir, docs_dir).items()):
        if path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(path)
    return changed
