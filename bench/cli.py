"""`python -m bench`: the benchmark's sections, each saved to bench/results/<section>.json,
and the docs' figures regenerated from the saved results (bench/docs.py).

- server (this module): Berth and CNCF distribution up, phases measured in turn against
  each. Every phase runs the same client job against every server, repetition by
  repetition, alternating servers, so that slow drifts of a shared machine hit both
  alike. The server's CPU and peak memory are taken around each job, from /proc.
- operator (bench/operator_figures.py): apply -> children, fan-out, memory.
- replication (bench/replication.py): two regions beside skopeo, from push done.
- scale-out (bench/scale_out.py): Berth on S3 + PostgreSQL, one replica and two behind a
  balancer, beside distribution on the same object store and Berth on the filesystem.
- pull-through (bench/pull_through.py): pulls through Berth's cache and distribution's
  proxy from a distribution upstream, beside direct pulls (skopeo).
- tls (bench/tls.py): a 256 MiB pull over TLS against plain HTTP, direct and through the
  node proxy (curl), with server and relay CPU per GiB.
- clients (bench/clients.py): push and pull of 1 x 256 MiB and 64 x 1 MiB with curl,
  crane and the Python harness, Berth against distribution, with server CPU and the
  seconds the server waited for block I/O.
- operator-scale (bench/operator_scale.py), only when named: 500 / 2,000 / 10,000
  Repositories of one Registry, all Ready, one more, RSS; then 1,000 Registries with 3
  Repositories each through an operator restart (docs/operator.md, "Scale").

`--only operator` (or a comma list) runs some of them; the others' saved results and
figures stay as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import (
    docs,
    limits,
    meta,
    operator_figures,
    operator_scale,
    page_cache,
    procs,
    replication,
    report,
)
from bench.client import MANIFEST_ACCEPT

MiB = 1 << 20
Job = dict[str, Any]
Result = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    large_bytes: int = 256 * MiB
    small_count: int = 64
    small_bytes: int = 1 * MiB
    blob_concurrency: int = 8
    manifest_requests: int = 50_000
    manifest_concurrency: int = 32
    tags: int = 10_000
    repos: int = 10_000
    list_requests: int = 5_000
    # Request-rate phases stop after this many seconds if the count is not reached.
    request_seconds: float = 4.0
    list_concurrency: int = 8
    populate_concurrency: int = 32
    populate_measured: int = 2_000
    reps: int = 3
    # Blob phases are short (a pull of 256 MiB takes a fraction of a second): more samples.
    blob_reps: int = 4
    client_procs: int = 2


FULL = Settings()
QUICK = Settings(
    large_bytes=4 * MiB,
    small_count=8,
    small_bytes=64 * 1024,
    blob_concurrency=4,
    manifest_requests=200,
    manifest_concurrency=8,
    tags=40,
    repos=40,
    list_requests=20,
    list_concurrency=4,
    request_seconds=1.0,
    populate_concurrency=8,
    populate_measured=20,
    reps=1,
    blob_reps=1,
    client_procs=1,
)

# Phase -> phases whose data it needs.
PHASES: dict[str, tuple[str, ...]] = {
    "push_large": (),
    "push_small": (),
    "pull_large": ("push_large",),
    "pull_small": ("push_small",),
    "populate_tags": (),
    "populate_repos": ("populate_tags",),
    "manifests": ("populate_tags",),
    "tag_list": ("populate_tags",),
    "catalog": ("populate_repos",),
    "ui": ("populate_repos",),
}

LARGE_REPO = "bench/large"
SMALL_REPO = "bench/small"
TAGS_REPO = "bench/tags"


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _percentile(values: Sequence[int], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return float(ordered[index])


def _window(results: Sequence[Result]) -> float:
    return max(float(r["end"]) for r in results) - min(float(r["start"]) for r in results)


def throughput(results: Sequence[Result]) -> float:
    """MB/s (10^6 bytes) over the window that all client processes together took."""
    return sum(int(r["bytes"]) for r in results) / _window(results) / 1e6


def rate(results: Sequence[Result]) -> float:
    return sum(int(r["count"]) for r in results) / _window(results)


def p99_ms(results: Sequence[Result]) -> float:
    merged = [lat for r in results for lat in r["latencies_us"]]
    return _percentile(merged, 99) / 1000


class ClientError(RuntimeError):
    pass


def run_clients(jobs: Sequence[Job], meter: procs.Meter | None) -> tuple[list[Result], Any]:
    """Start one client process per job; measure the server while they all run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(procs.REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=procs.REPO_ROOT,
            env=env,
        )
        for _ in jobs
    ]
    try:
        for client, job in zip(clients, jobs, strict=True):
            assert client.stdin is not None
            client.stdin.write(json.dumps(job) + "\n")
            client.stdin.flush()
        for client in clients:
            assert client.stdout is not None
            line = client.stdout.readline()
            if line.strip() != "ready":
                raise ClientError(f"client failed before the run: {line.strip()}")
        if meter is not None:
            meter.start()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        results: list[Result] = []
        for client in clients:
            assert client.stdout is not None
            results.append(json.loads(client.stdout.readline() or '{"error": "no output"}'))
        usage = meter.stop() if meter is not None else None
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise ClientError("; ".join(errors))
        return results, usage
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait()


def _store_cpu(usage: Sequence[procs.Usage]) -> dict[str, float]:
    values = [u.store_cpu_s for u in usage if u.store_cpu_s is not None]
    return {"store_cpu_s": _median(values)} if values else {}


class Bench:
    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        servers: dict[str, procs.Server],
        ours: str,
        theirs: str,
        meters: dict[str, procs.Meter] | None = None,
    ) -> None:
        self.s = settings
        self.workdir = workdir
        self.servers = servers
        self.ours = ours
        self.theirs = theirs
        self.data = workdir / "www" / "blob.bin"
        self.rows: list[report.Row] = []
        self.limits: list[report.Limit] = []
        self.phases: list[dict[str, Any]] = []
        self.large: dict[str, str] = {}  # server -> digest of a pushed large blob
        self.small: dict[str, list[str]] = {}
        self.nonce_counter = 0
        self.evicted = False  # stored blobs dropped from the page cache before pushes
        # By default each server's own process tree; a setup of several processes (say
        # replicas behind a balancer) brings a meter of its own.
        self.meters = (
            meters
            if meters is not None
            else {name: procs.Meter(server.pid) for name, server in servers.items()}
        )

    # -- plumbing --------------------------------------------------------------------------

    def _recycle(self, name: str) -> None:
        """Before a push to server ``name``: its stored blobs leave the page cache, so
        the push writes into recycled pages as the disk limit does (bench/page_cache.py).
        Only its own: the other's last pushed blobs stay cached for the pull phases."""
        storage = self.servers[name].storage
        if storage is not None:
            page_cache.evict_blobs(storage)
            self.evicted = True

    def _nonce(self) -> str:
        self.nonce_counter += 1
        return (
            f"berth-bench-{os.getpid()}-{self.nonce_counter}-{time.time_ns()}".encode()
            .hex()[:64]
            .ljust(64, "0")
        )

    def _split(self, job: Job, total: int) -> list[Job]:
        """``total`` requests at the job's concurrency over the client processes."""
        n = min(self.s.client_procs, job["concurrency"])
        return [
            {
                **job,
                "count": total // n + (1 if i < total % n else 0),
                "concurrency": job["concurrency"] // n + (1 if i < job["concurrency"] % n else 0),
            }
            for i in range(n)
        ]

    def measure(
        self,
        key: str,
        label: str,
        jobs_for: Callable[[str, procs.Server, int], list[Job]],
        reps: int,
        names: Sequence[str] | None = None,
        before_each: Callable[[str], None] | None = None,
    ) -> dict[str, list[list[Result]]]:
        names = list(names or self.servers)
        out: dict[str, list[list[Result]]] = {n: [] for n in names}
        usage: dict[str, list[procs.Usage]] = {n: [] for n in names}
        started = time.monotonic()
        for rep in range(reps):
            for name in names:
                if before_each is not None:
                    before_each(name)
                results, used = run_clients(
                    jobs_for(name, self.servers[name], rep), self.meters[name]
                )
                out[name].append(results)
                usage[name].append(used)
        servers: dict[str, dict[str, Any]] = {}
        for name in names:
            cpu = [u.cpu_s for u in usage[name]]
            client_cpu = [sum(float(r.get("cpu_s", 0.0)) for r in rs) for rs in out[name]]
            requests = [sum(int(r.get("count", 0)) for r in rs) for rs in out[name]]
            servers[name] = {
                "requests": _median(requests),
                "cpu_ms_per_request": _median(
                    [1000 * u.cpu_s / n for u, n in zip(usage[name], requests, strict=True) if n]
                    or [0.0]
                ),
                "cpu_s": _median(cpu),
                "cpu_samples": cpu,
                "peak_rss_mib": max(u.peak_rss_mib for u in usage[name]),
                "client_cpu_s": _median(client_cpu),
                **_store_cpu(usage[name]),
                "wall_s": _median([_window(rs) for rs in out[name]]),
            }
        self.phases.append({"key": key, "label": label, "servers": servers})
        print(f"  {label}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        return out

    def row(
        self,
        key: str,
        label: str,
        unit: str,
        higher: bool,
        results: dict[str, list[list[Result]]],
        metric: Callable[[Sequence[Result]], float],
    ) -> None:
        samples = {n: [metric(rs) for rs in reps] for n, reps in results.items()}
        # Best of the repetitions: on a shared machine interference only ever slows a
        # run down, so the best sample is the closest to what the server can do.
        best = max if higher else min
        values: dict[str, float | None] = {n: best(v) for n, v in samples.items()}
        self.rows.append(report.Row(key, label, unit, higher, values, samples))
        shown = ", ".join(f"{n} {report.fmt(v)}" for n, v in values.items())
        print(f"    {label}: {shown} {unit}", file=sys.stderr, flush=True)

    # -- limits ----------------------------------------------------------------------------

    def measure_limits(self) -> None:
        reps = max(self.s.reps, 1)
        sha = [limits.sha256_mbps(self.data, self.s.large_bytes) for _ in range(reps)]
        self.limits.append(
            report.Limit("sha256", "hashlib sha256, 1 MiB updates", "MB/s", max(sha), sha)
        )
        disk = [
            limits.disk_write_mbps(self.data, self.workdir / "dd.tmp", self.s.large_bytes)
            for _ in range(reps)
        ]
        label = f"disk write {self.s.large_bytes // MiB} MiB + fsync (dd-like)"
        self.limits.append(report.Limit("disk_write", label, "MB/s", max(disk), disk))

    # -- phases ----------------------------------------------------------------------------

    def push_large(self) -> None:
        def jobs(name: str, server: procs.Server, rep: int) -> list[Job]:
            return [
                {
                    "kind": "push",
                    "base": server.base_url,
                    "repo": LARGE_REPO,
                    "data": str(self.data),
                    "blobs": [[0, self.s.large_bytes]],
                    "nonce": self._nonce(),
                    "concurrency": 1,
                }
            ]

        size = self.s.large_bytes // MiB
        res = self.measure(
            "push_large", f"push 1 x {size} MiB", jobs, self.s.blob_reps, before_each=self._recycle
        )
        self.large = {n: reps[-1][0]["digests"][0] for n, reps in res.items()}
        label = f"blob push, 1 x {size} MiB (POST+PUT)"
        self.row("push_large", label, "MB/s", True, res, throughput)

    def _small_regions(self) -> list[list[int]]:
        return [[i * self.s.small_bytes, self.s.small_bytes] for i in range(self.s.small_count)]

    def _small_label(self) -> str:
        size = self.s.small_bytes
        each = f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"
        return f"{self.s.small_count} x {each}, c={self.s.blob_concurrency}"

    def push_small(self) -> None:
        def jobs(name: str, server: procs.Server, rep: int) -> list[Job]:
            return [
                {
                    "kind": "push",
                    "base": server.base_url,
                    "repo": SMALL_REPO,
                    "data": str(self.data),
                    "blobs": self._small_regions(),
                    "nonce": self._nonce(),
                    "concurrency": self.s.blob_concurrency,
                }
            ]

        label = f"push {self._small_label()}"
        res = self.measure("push_small", label, jobs, self.s.blob_reps, before_each=self._recycle)
        self.small = {n: reps[-1][0]["digests"] for n, reps in res.items()}
        self.row("push_small", f"blob push, {self._small_label()}", "MB/s", True, res, throughput)

    def pull_large(self, nginx: procs.Server | None) -> None:
        size = self.s.large_bytes

        def jobs(name: str, server: procs.Server, rep: int) -> list[Job]:
            if name == "nginx":
                url = f"{server.base_url}/{self.data.name}"
            else:
                url = f"{server.base_url}/v2/{LARGE_REPO}/blobs/{self.large[name]}"
            return [{"kind": "pull", "urls": [[url, size]], "concurrency": 1}]

        names = list(self.servers)
        if nginx is not None:
            # nginx takes its turn in the same rounds, so it sees the same conditions.
            self.servers["nginx"] = nginx
            self.meters["nginx"] = procs.Meter(nginx.pid)
            names.append("nginx")
        try:
            res = self.measure(
                "pull_large", f"pull 1 x {size // MiB} MiB", jobs, self.s.blob_reps, names
            )
        finally:
            self.servers.pop("nginx", None)
        ngx = res.pop("nginx", None)
        self.row("pull_large", f"blob pull, 1 x {size // MiB} MiB", "MB/s", True, res, throughput)
        if ngx is not None:
            samples = [throughput(rs) for rs in ngx]
            label = f"nginx static file over loopback, 1 x {size // MiB} MiB (same client)"
            self.limits.append(report.Limit("nginx", label, "MB/s", max(samples), samples))

    def pull_small(self) -> None:
        size = self.s.small_bytes

        def jobs(name: str, server: procs.Server, rep: int) -> list[Job]:
            urls = [
                [f"{server.base_url}/v2/{SMALL_REPO}/blobs/{d}", size] for d in self.small[name]
            ]
            return [{"kind": "pull", "urls": urls, "concurrency": self.s.blob_concurrency}]

        res = self.measure("pull_small", f"pull {self._small_label()}", jobs, self.s.blob_reps)
        self.row("pull_small", f"blob pull, {self._small_label()}", "MB/s", True, res, throughput)

    def tag_names(self) -> list[str]:
        return [f"t{i:05d}" for i in range(self.s.tags)]

    def repo_names(self) -> list[str]:
        return [f"bench/repos/r{i:05d}" for i in range(self.s.repos)]

    def _populate(self, kind: str, names: list[str], label: str, unit: str) -> None:
        """Measure the first ``populate_measured`` names on each server alone, then fill
        in the rest on all servers at once (unmeasured) to keep the run short."""
        measured = names[: self.s.populate_measured]
        rest = names[self.s.populate_measured :]

        def job(server: procs.Server, subset: list[str]) -> Job:
            return {
                "kind": kind,
                "base": server.base_url,
                "source": TAGS_REPO,
                "names": subset,
                "concurrency": self.s.populate_concurrency,
            }

        res = self.measure(
            kind, f"{label}, first {len(measured):,}", lambda n, srv, r: [job(srv, measured)], 1
        )
        self.row(kind, f"{label}, first {len(measured):,}", unit, True, res, rate)
        if rest:
            started = time.monotonic()
            servers = [srv for name, srv in self.servers.items() if name != "nginx"]
            run_clients([job(srv, rest) for srv in servers], None)
            print(
                f"  filled {len(rest):,} more on every server at once:"
                f" {time.monotonic() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def populate_tags(self) -> None:
        c = self.s.populate_concurrency
        label = f"manifest PUT by new tag (to {self.s.tags:,}), c={c}"
        self._populate("populate_tags", self.tag_names(), label, "req/s")

    def populate_repos(self) -> None:
        c = self.s.populate_concurrency
        label = f"new repository: 2 mounts + manifest PUT (to {self.s.repos:,}), c={c}"
        self._populate("populate_repos", self.repo_names(), label, "repos/s")

    def requests_phase(
        self,
        key: str,
        label: str,
        method: str,
        path_for: Callable[[int], str],
        variants: int,
        total: int,
        concurrency: int,
        min_bytes: int = 0,
        headers: dict[str, str] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        def jobs(name: str, server: procs.Server, rep: int) -> list[Job]:
            requests = [
                {"method": method, "url": server.base_url + path_for(i), "headers": headers or {}}
                for i in range(variants)
            ]
            job = {
                "kind": "requests",
                "requests": requests,
                "concurrency": concurrency,
                "min_bytes": min_bytes,
                "seconds": self.s.request_seconds,
            }
            return self._split(job, total)

        res = self.measure(key, label, jobs, self.s.reps, names)
        self.row(key, f"{label}, c={concurrency}", "req/s", True, res, rate)
        self.row(key + "_p99", f"{label}, c={concurrency}, p99", "ms", False, res, p99_ms)

    def manifests(self) -> None:
        tags = self.tag_names()
        variants = min(100, len(tags))
        for method in ("GET", "HEAD"):
            self.requests_phase(
                f"manifest_{method.lower()}",
                f"manifest {method} by tag",
                method,
                lambda i: f"/v2/{TAGS_REPO}/manifests/{tags[i]}",
                variants,
                self.s.manifest_requests,
                self.s.manifest_concurrency,
                headers={"Accept": MANIFEST_ACCEPT},
            )

    def tag_list(self) -> None:
        self.requests_phase(
            "tag_list",
            f"tag list, {self.s.tags:,} tags",
            "GET",
            lambda i: f"/v2/{TAGS_REPO}/tags/list",
            1,
            self.s.list_requests,
            self.s.list_concurrency,
            min_bytes=self.s.tags * 9,
        )

    def catalog(self) -> None:
        n = min(self.s.repos, 10_000)
        self.requests_phase(
            "catalog",
            f"catalog, {self.s.repos:,} repos, ?n={n}",
            "GET",
            lambda i: f"/v2/_catalog?n={n}",
            1,
            self.s.list_requests,
            self.s.list_concurrency,
            min_bytes=n * len("bench/repos/r00000") // 2,
        )
        self.requests_phase(
            "catalog_page",
            f"catalog first page, {self.s.repos:,} repos, ?n=100",
            "GET",
            lambda i: "/v2/_catalog?n=100",
            1,
            self.s.list_requests,
            self.s.list_concurrency,
        )

    def ui(self) -> None:
        """The web UI's pages at full size: the first and a middle page of the
        repositories, a search, the first and a middle page of the 10,000 tags
        (Berth only: distribution has no UI)."""
        tags, repos = self.tag_names(), self.repo_names()
        paths = [
            "/ui/",
            f"/ui/?last={repos[len(repos) // 2]}",
            "/ui/?q=r0001",
            f"/ui/repository?name={TAGS_REPO}",
            f"/ui/repository?name={TAGS_REPO}&last={tags[len(tags) // 2]}",
        ]
        self.requests_phase(
            "ui_pages",
            f"web UI pages ({self.s.repos:,} repos, {self.s.tags:,} tags)",
            "GET",
            lambda i: paths[i],
            len(paths),
            self.s.list_requests,
            self.s.list_concurrency,
            min_bytes=1000,
            names=[name for name in self.servers if name == "berth"],
        )


def machine_notes(workdir: Path, binaries: dict[str, str]) -> dict[str, str]:
    notes = meta.machine(workdir)
    notes["distribution"] = meta.first_line([binaries["distribution"], "--version"])
    notes["nginx"] = meta.first_line([binaries["nginx"], "-v"])
    return notes


def _with_deps(selected: Sequence[str]) -> list[str]:
    wanted: set[str] = set()
    todo = list(selected)
    while todo:
        phase = todo.pop()
        if phase not in PHASES:
            raise SystemExit(f"bench: unknown phase {phase!r}; known: {', '.join(PHASES)}")
        if phase not in wanted:
            wanted.add(phase)
            todo.extend(PHASES[phase])
    return [p for p in PHASES if p in wanted]


SECTIONS = docs.SECTIONS
# Run only when named (--only operator-scale): four control planes, about 30 minutes.
# Its figures go into docs/operator.md ("Scale"), not through bench/docs.py.
EXTRA_SECTIONS = ("operator-scale",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma list of sections to run: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="directory of the saved results, one JSON file per section (default:"
        " bench/results; .bench/partial with --quick, --phases, --no-distribution, --profile)",
    )
    parser.add_argument(
        "--docs-dir",
        type=Path,
        default=None,
        help="regenerate the docs' figures in this directory (default: docs/, but not after a"
        " partial run)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate the docs")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scratch dir")
    group = parser.add_argument_group("server section")
    group.add_argument(
        "--workers",
        default=os.environ.get("BENCH_BERTH_WORKERS", "1"),
        help="Berth worker processes; a comma list runs one Berth per value (first is compared)",
    )
    group.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    group.add_argument("--phases", default="", help=f"comma list of: {', '.join(PHASES)}")
    group.add_argument("--no-distribution", action="store_true", help="measure Berth only")
    group.add_argument("--keep", action="store_true", help="keep the scratch directory")
    group.add_argument("--distribution-bin", default=None, help="default: docker-registry")
    group.add_argument("--nginx-bin", default=None, help="default: nginx")
    group.add_argument(
        "--server-src",
        type=Path,
        default=procs.REPO_ROOT,
        help="directory holding the registry_server package to run (default: this tree)",
    )
    group.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run Berth (1 worker) under cProfile and write the stats to this file",
    )
    group = parser.add_argument_group("operator section")
    group.add_argument(
        "--namespaces",
        type=int,
        default=None,
        help="namespaces to fan pull Secrets out to (default: $BENCH_FANOUT_NAMESPACES or"
        f" {operator_figures.Settings.namespaces}; 1000 is the design's figure, a longer run)",
    )
    group.add_argument("--registries", type=int, default=None, help="Registries applied in turn")
    group.add_argument("--repositories", type=int, default=None, help="Repositories for the RSS")
    group = parser.add_argument_group("scale-out section (also takes --reps, --keep)")
    group.add_argument(
        "--note", default="", help="a sentence saved with the result and shown in the docs"
    )
    group = parser.add_argument_group("replication section")
    group.add_argument("--images", type=int, default=None, help="small images pushed in turn")
    group.add_argument("--big-mib", type=int, default=None, help="size of the large image")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in str(args.only).split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown or not args.sections:
        known = ", ".join((*SECTIONS, *EXTRA_SECTIONS))
        parser.error(f"--only takes {known}; not {', '.join(sorted(unknown))}")
    # A partial run's figures must not replace the saved result the docs are made from.
    partial = args.quick or args.phases or args.no_distribution or args.profile
    if args.results is None:
        args.results = procs.REPO_ROOT / ".bench" / "partial" if partial else meta.RESULTS_DIR
    if args.docs_dir is None and not partial:
        args.docs_dir = procs.REPO_ROOT / "docs"
    if args.docs_dir is None:
        args.no_docs = True
    return args


def run_server(args: argparse.Namespace) -> report.Report:
    settings = QUICK if args.quick else FULL
    if args.reps is not None:
        settings = replace(settings, reps=args.reps)
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.profile is not None and workers != [1]:
        raise SystemExit("bench: --profile needs --workers 1")
    phases = _with_deps([p for p in args.phases.split(",") if p]) if args.phases else list(PHASES)
    binaries = {
        "distribution": args.distribution_bin or procs.find_binary("docker-registry") or "",
        "nginx": args.nginx_bin or procs.find_binary("nginx") or "",
    }
    for name, path in binaries.items():
        if not path and not (name == "distribution" and args.no_distribution):
            raise SystemExit(f"bench: {name} is not installed; run `make tools`")

    started = time.monotonic()
    load_before = meta.load()
    workdir = Path(tempfile.mkdtemp(prefix="berth-bench-", dir=args.workdir))
    servers: dict[str, procs.Server] = {}
    nginx: procs.Server | None = None
    try:
        print(f"bench: scratch directory {workdir}", file=sys.stderr, flush=True)
        data = workdir / "www" / "blob.bin"
        limits.make_data_file(data, settings.large_bytes)
        for w in workers:
            name = "berth" if len(workers) == 1 else f"berth-w{w}"
            server = procs.berth(workdir, w, src=args.server_src.resolve())
            if args.profile is not None:
                server.argv[1:1] = ["-m", "cProfile", "-o", str(args.profile.resolve())]
            servers[name] = server.start()
        if not args.no_distribution:
            servers["distribution"] = procs.distribution(workdir, binaries["distribution"]).start()
        nginx = procs.nginx(workdir, data.parent, binaries["nginx"]).start()
        ours = next(iter(servers))
        theirs = "distribution"
        bench = Bench(settings, workdir, servers, ours, theirs)
        base_cpu = {n: procs.cpu_seconds(s.pid) for n, s in servers.items()}
        print("bench: machine limits", file=sys.stderr, flush=True)
        bench.measure_limits()
        for phase in phases:
            print(f"bench: {phase}", file=sys.stderr, flush=True)
            if phase == "pull_large":
                bench.pull_large(nginx)
            else:
                getattr(bench, phase)()
        names = list(servers)
        total_cpu: dict[str, float | None] = {
            n: procs.cpu_seconds(servers[n].pid) - base_cpu[n] for n in names
        }
        peaks: dict[str, float | None] = {
            n: max(
                (p["servers"][n]["peak_rss_mib"] for p in bench.phases if n in p["servers"]),
                default=None,
            )
            for n in names
        }
        bench.rows.append(report.Row("cpu_total", "server CPU, whole run", "s", False, total_cpu))
        bench.rows.append(
            report.Row("peak_rss", "server peak RSS (max over phases)", "MiB", False, peaks)
        )
        result = report.Report(
            date=meta.now(),
            # The server measured is the one in --server-src (a checkout of its own, say).
            commit=meta.commit(("registry_server",), args.server_src.resolve()),
            machine={
                **machine_notes(workdir, binaries),
                # The machine may be shared: how busy it was tells how much to trust a row.
                "load average (1 min) before / after": f"{load_before:.1f} / {meta.load():.1f}",
                **({"page cache before each push": page_cache.NOTE} if bench.evicted else {}),
            },
            settings={
                **{k: v for k, v in asdict(settings).items()},
                "berth_workers": ",".join(map(str, workers)),
                "quick": args.quick,
            },
            ours=ours,
            theirs=theirs,
            columns=names,
            rows=bench.rows,
            limits=bench.limits,
            phases=bench.phases,
            floor=[
                report.Limit(f"python_{i}", label, "MiB", mib)
                for i, (label, mib) in enumerate(limits.python_floor())
            ],
            duration_s=time.monotonic() - started,
        )
    except BaseException:
        ports = [str(s.port) for s in [*servers.values(), *([nginx] if nginx else [])]]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            sockets = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
            mine = [ln for ln in sockets.splitlines() if any(f":{p} " in ln for p in ports)]
            print("--- sockets on the servers' ports ---", *mine[:40], sep="\n", file=sys.stderr)
        for server in [*servers.values(), *([nginx] if nginx else [])]:
            print(
                f"--- {server.name} ({server.state()}) log, last lines ---\n{server.log_tail()}",
                file=sys.stderr,
            )
        raise
    finally:
        for server in [*servers.values(), *([nginx] if nginx else [])]:
            server.stop()
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.text(result))
    return result


def run_operator(args: argparse.Namespace) -> dict[str, Any]:
    settings = operator_figures.QUICK if args.quick else operator_figures.Settings()
    namespaces = args.namespaces or operator_figures.namespaces_from_env(settings.namespaces)
    changes = {
        "namespaces": namespaces,
        "registries": args.registries or settings.registries,
        "repositories": args.repositories or settings.repositories,
    }
    settings = replace(settings, **changes)
    missing = operator_figures.missing_tools()
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} missing; run `make tools`")
    print(
        f"bench: operator section: {settings.registries} Registries, fan-out to"
        f" {settings.namespaces} namespaces, {settings.repositories} Repositories",
        file=sys.stderr,
        flush=True,
    )
    started, load_before = time.monotonic(), meta.load()
    with meta.scratch("operator", args.workdir, args.keep) as workdir:
        figures = operator_figures.run(settings, workdir)
    result = meta.envelope(
        "operator", ("operator", "crds", "bench"), started, load_before, meta.machine(workdir)
    )
    result["machine"].update(operator_figures.kube_versions())
    return {**result, **figures}


def run_replication(args: argparse.Namespace) -> dict[str, Any]:
    settings = replication.QUICK if args.quick else replication.Settings()
    changes = {
        "images": args.images or settings.images,
        "big_mib": args.big_mib or settings.big_mib,
    }
    settings = replace(settings, **changes)
    print(
        f"bench: replication section: {settings.images} small images,"
        f" one of {settings.big_mib} MiB",
        file=sys.stderr,
        flush=True,
    )
    started, load_before = time.monotonic(), meta.load()
    workdir = Path(tempfile.mkdtemp(prefix="berth-bench-replication-", dir=args.workdir))
    try:
        figures = replication.run(settings, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    paths = ("registry_server", "bench")
    envelope = meta.envelope("replication", paths, started, load_before, meta.machine(workdir))
    return {**envelope, **figures}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    for section in args.sections:
        started = time.monotonic()
        path = args.results / docs.result_file(section)
        if section == "server":
            path.write_text(run_server(args).to_json())
        elif section == "scale-out":
            # Imported here: bench.scale_out builds on this module (Bench, Settings).
            from bench import scale_out

            path.write_text(json.dumps(scale_out.run_section(args), indent=2) + "\n")
        elif section == "pull-through":
            from bench import pull_through

            path.write_text(json.dumps(pull_through.run_section(args), indent=2) + "\n")
        elif section == "tls":
            from bench import tls

            path.write_text(json.dumps(tls.run_section(args), indent=2) + "\n")
        elif section == "clients":
            from bench import clients

            path.write_text(json.dumps(clients.run_section(args), indent=2) + "\n")
        elif section == "operator-scale":
            docs_dir = None if args.no_docs else args.docs_dir
            path = operator_scale.run_section(args.results, docs_dir, quick=args.quick)
        else:
            result = run_operator(args) if section == "operator" else run_replication(args)
            path.write_text(json.dumps(result, indent=2) + "\n")
        took[section] = time.monotonic() - started
        print(f"bench: {section} took {took[section]:.0f} s; wrote {path}", file=sys.stderr)
    if not args.no_docs:
        for changed in docs.write(args.results, args.docs_dir):
            print(f"bench: wrote {changed}", file=sys.stderr)
    print(
        "bench: " + ", ".join(f"{s} {t:.0f} s" for s, t in took.items()),
        file=sys.stderr,
        flush=True,
    )
    return 0
