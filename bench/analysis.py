"""The analysis under the server's table in docs/benchmarks.md, written from the same
saved result as the table: every number in it, and every "above"/"below", is computed
here, so the prose can never quote another run than the table above it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.report import Report, fmt


def _display(column: str) -> str:
    """How the prose names a column: "berth" is Berth."""
    return "B" + column[1:] if column.startswith("berth") else column


def _ratio_word(a: float, b: float) -> str:
    """How ``a`` compares to ``b``: within 3 % is "level with"."""
    if a > b * 1.03:
        return "above"
    if a < b / 1.03:
        return "below"
    return "level with"


def _usage(report: Report, phase: str, server: str) -> dict[str, Any]:
    usage: dict[str, Any] = report.phase(phase)["servers"][server]
    return usage


def _ms_per_request(report: Report, phase: str, server: str) -> str:
    return f"{fmt(_usage(report, phase, server)['cpu_ms_per_request'])} ms"


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return fmt(low) if fmt(low) == fmt(high) else f"{fmt(low)}-{fmt(high)}"


def _spread(report: Report) -> tuple[float, str]:
    """The largest best/worst ratio between the repetitions of one row, and that row."""
    worst, label = 1.0, ""
    for row in report.rows:
        for samples in row.samples.values():
            positive = [s for s in samples if s > 0]
            if len(positive) > 1 and max(positive) / min(positive) > worst:
                worst, label = max(positive) / min(positive), row.label
    return worst, label


def _summary(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    below = [
        f"{row.label} ({ratio:.2f})"
        for row in report.rows
        if (ratio := row.ratio(ours, theirs)) is not None and ratio < 1.0
    ]
    load = report.machine.get("load average (1 min) before / after", "?")
    cores = report.machine.get("cpu", "?").split(" x ")[0]
    spread, spread_row = _spread(report)
    verdict = (
        f"In this run {we} is at or ahead of {they} on every row."
        if not below
        else f"In this run {we} is behind {they} on: {'; '.join(below)}."
    )
    return (
        f"From the run above ({cores} cores; load average before / after the run {load},"
        f" raised by the bench itself and any other work on the machine). {verdict}"
        f" Repetitions of one row differed by up to {spread:.1f}x in this run ({spread_row}),"
        " which is why a row is the best of its repetitions."
    )


def _pull(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    pull = report.row("pull_large")
    berth, dist = pull.values[ours] or 0.0, pull.values[theirs] or 0.0
    nginx_limit = report.limit("nginx")
    if nginx_limit is None:
        return ""
    nginx = nginx_limit.value
    cpu_ours = _usage(report, "pull_large", ours)["cpu_s"]
    cpu_theirs = _usage(report, "pull_large", theirs)["cpu_s"]
    return (
        f"- *Blob pull*: {we} sends the large blob at {fmt(berth)} MB/s,"
        f" {_ratio_word(berth, nginx)} nginx's {fmt(nginx)} MB/s for the same file through"
        " the same client in the same run (both from the page cache: nginx with sendfile,"
        f" {we} with reads and writes by a thread);"
        f" {they} reaches {fmt(dist)} MB/s. CPU per pull: {cpu_ours:.2f} s for {we},"
        f" {cpu_theirs:.2f} s for {they}."
    )


def _push(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    push = report.row("push_large")
    berth, dist = push.values[ours] or 0.0, push.values[theirs] or 0.0
    sha_limit, disk_limit = report.limit("sha256"), report.limit("disk_write")
    if sha_limit is None or disk_limit is None:
        return ""
    sha, disk = sha_limit.value, disk_limit.value
    bound = min(sha, disk)
    serial = 1 / (1 / sha + 1 / disk)  # one thread hashes a batch, then writes it
    return (
        f"- *Blob push* of the large blob: {fmt(berth)} MB/s for {we}, {fmt(dist)} for"
        f" {they}, where hashing alone runs at {fmt(sha)} MB/s and the disk writes"
        f" {fmt(disk)} MB/s: {berth / bound:.0%} of the lower of the two. In {we} a body"
        " that streams alone is hashed by the event loop thread as each piece arrives,"
        " and a thread writes each ~1 MiB batch while the next one arrives (one batch in"
        " flight); a body beside others is hashed by its writing thread before each write,"
        f" which bounds it at {fmt(serial)} MB/s with these figures"
        f" ({serial / bound:.0%} of the lower limit). On two cores the client, the loop's"
        " receiving and hashing, and the writes share the cores ([Clients](#clients))."
    )


def _manifests(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    get = _usage(report, "manifest_get", ours)
    client_ms = 1000 * get["client_cpu_s"] / get["requests"] if get["requests"] else 0.0
    return (
        f"- *Manifest GET/HEAD*: {we} spends {_ms_per_request(report, 'manifest_get', ours)}"
        f" of CPU per GET and {_ms_per_request(report, 'manifest_head', ours)} per HEAD,"
        f" {they} {_ms_per_request(report, 'manifest_get', theirs)} and"
        f" {_ms_per_request(report, 'manifest_head', theirs)}. On this machine the"
        " request-rate rows are bounded by the machine as a whole: the Python load"
        f" generator used {get['client_cpu_s']:.1f} CPU s for {get['requests']:,.0f} GETs"
        f" ({client_ms:.2f} ms each) in the same phase, so the CPU-per-request column is the"
        " cleaner comparison. `perf` on distribution (its stripped binary symbolised with"
        " `go tool addr2line`) put most of its time in the Go garbage collector and in"
        " `regexp` compilation on every request; we did not dig further."
    )


def _tag_list(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    tags = report.settings.get("tags", 0)
    return (
        f"- *Tag list at {tags:,} tags*: {_ms_per_request(report, 'tag_list', ours)} of CPU"
        f" per request for {we}, {_ms_per_request(report, 'tag_list', theirs)} for {they}."
        f" {we} keeps each repository's list in memory, serialised once, for the count of"
        " tag changes the index holds for it: a request is one indexed read of that count"
        " and the kept bytes sent; a push, move or delete of a tag makes the next request"
        " list the names again."
    )


def _catalog(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    return (
        f"- *Catalog*: {they} walks the storage tree on every request"
        f" ({_ms_per_request(report, 'catalog', theirs)} of CPU for the whole catalog,"
        f" {_ms_per_request(report, 'catalog_page', theirs)} even for the first 100 names);"
        f" {we} answers from its index ({_ms_per_request(report, 'catalog', ours)} and"
        f" {_ms_per_request(report, 'catalog_page', ours)})."
    )


def _writes(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    tags = report.row("populate_tags").ratio(ours, theirs) or 0.0
    repos = report.row("populate_repos").ratio(ours, theirs) or 0.0
    return (
        "- *Write paths*: a tag push is one index transaction, and concurrent ones share"
        " a commit (group commit); a new repository is two blob mounts and a manifest PUT."
        " A mount's link joins the group too, its check that the blob's file is there"
        " running under the group's transaction (the index write lock, for garbage"
        f" collection): ratio {repos:.2f} for that row, {tags:.2f} for the tag row."
    )


def _memory(report: Report) -> str:
    ours, theirs = report.ours, report.theirs
    we, they = _display(ours), _display(theirs)
    phases = [p for p in report.phases if ours in p["servers"] and theirs in p["servers"]]
    mine = [float(p["servers"][ours]["peak_rss_mib"]) for p in phases]
    other = [float(p["servers"][theirs]["peak_rss_mib"]) for p in phases]
    lower = [p["label"] for p, a, b in zip(phases, mine, other, strict=True) if b < a]
    if not lower:
        where = f"{they}'s is higher in every phase"
    elif len(lower) == len(phases):
        where = f"{they}'s is lower in every phase"
    else:
        where = f"{they}'s is lower in {len(lower)} of {len(phases)} phases ({'; '.join(lower)})"
    peak = report.row("peak_rss")
    text = (
        f"- *Memory*: {we}'s peak RSS per phase is {_range(mine)} MiB, {they}'s"
        f" {_range(other)} MiB; {where}. The main table's row compares the largest phase of"
        f" each (ratio {peak.ratio(ours, theirs) or 0.0:.2f})."
    )
    if len(report.floor) >= 3:
        bare, libs, app = (fmt(f.value) for f in report.floor[:3])
        share = "most" if report.floor[2].value * 2 >= min(mine) else "a part"
        text += (
            f" The Python floor is {share} of {we}'s: a fresh interpreter is {bare} MiB,"
            f" importing uvloop and aiohttp's server brings it to {libs} MiB and the"
            f" application to {app} MiB (measured in the same run)."
        )
    return text


def server(report: Report) -> str:
    """The generated analysis (markdown)."""
    parts = [_summary(report), "", "**Where the numbers come from.**", ""]
    for bullet in (_pull, _push, _manifests, _tag_list, _catalog, _writes, _memory):
        try:
            text = bullet(report)
        except KeyError:  # a run of some phases only: no row, no sentence
            continue
        if text:
            parts.append(text)
    return "\n".join(parts) + "\n"
