"""Scale-out: Berth on S3 + PostgreSQL, one replica and two, beside CNCF distribution on
the same object store, with Berth on the filesystem as the reference (issue 12).

Three registries run together on this machine, seen as four setups, measured in turn
by the server section's phases (bench/cli.py's `Bench`: the same client jobs,
alternating setups every repetition, a row is the best repetition):

- `berth-fs`: one Berth process, filesystem storage and the SQLite index (the
  reference the S3 setups' blob rows are held to);
- `berth-s3-x1` and `berth-s3-x2`: one Berth registry of two processes (replicas) on
  one prefix of the bucket and one PostgreSQL database (`storage.driver: s3`,
  `metadata.driver: postgresql`). One replica: the clients talk to the first replica
  directly, the second idles. Two replicas: the clients talk to nginx balancing
  round-robin per request over both (tests/support/balancer.py), so the requests of one
  flow land on both;
- `distribution-s3`: CNCF distribution 2.8 (Debian `docker-registry`) with its own s3
  driver on the same bucket under its own root directory, `redirect: disable` so that
  it streams blobs as Berth does;
- `store-direct`, blob rows only: the object store itself, the same client jobs writing
  and reading plain objects through pre-signed URLs (one PUT or GET per blob, no
  registry between). It is what the store alone can take on this machine, the bound of
  the S3 setups' blob rows; measured after the four setups' rounds, not alternated
  with them.

The object store is SeaweedFS (`weed server -s3`, tests/support/s3_store.py, built by
`make tools`), the database a throwaway PostgreSQL cluster (tests/support/postgres.py).
Every Berth process has one worker and GC off. The 10,000 tags and 10,000 repositories
are pushed through the API into the three registries at once (the server section's
populate jobs, unmeasured but timed), so distribution's bucket holds the layout it
writes itself. A setup's CPU and peak memory are those of its registry processes (and
the balancer's, for two replicas); the store's CPU in each phase is reported beside
them (the store shares the two cores with everything else), the database's is not.

`python -m bench --only scale-out` saves bench/results/scale_out.json; its table goes
into docs/benchmarks.md ("The scale-out section") through bench/docs.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import yaml

from bench import cli, limits, meta, procs, report

Result = dict[str, Any]

FS = "berth-fs"
S3_ONE = "berth-s3-x1"
S3_TWO = "berth-s3-x2"
DISTRIBUTION = "distribution-s3"
STORE = "store-direct"
COLUMNS = (FS, S3_ONE, S3_TWO, DISTRIBUTION, STORE)
HEADINGS = {
    FS: "Berth, filesystem",
    S3_ONE: "Berth S3+PG, 1 replica",
    S3_TWO: "Berth S3+PG, 2 replicas",
    DISTRIBUTION: "distribution, S3",
    STORE: "SeaweedFS direct",
}
BLOB_ROWS = ("push_large", "push_small", "pull_large", "pull_small")
# The Berth S3 setups, each held to the goals.
BERTH_S3 = (S3_ONE, S3_TWO)

# Four setups in turn: fewer repetitions and shorter request phases than the server
# section, so that the whole section stays near five minutes.
SETTINGS = replace(
    cli.FULL,
    reps=2,
    blob_reps=2,
    request_seconds=2.0,
    list_concurrency=2,
    list_requests=2_000,
)
QUICK = replace(cli.QUICK, list_concurrency=2)


@dataclass(frozen=True)
class Goal:
    """The issue's goal for a row: each Berth S3 setup at least ``at_least`` times
    ``versus``'s value (throughput and rates: higher is better)."""

    keys: tuple[str, ...]
    versus: str
    at_least: float

    def describe(self) -> str:
        return f"≥ {self.at_least:g} x {HEADINGS[self.versus]}"


GOALS = (
    Goal(BLOB_ROWS, FS, 0.8),
    Goal(("tag_list", "catalog"), DISTRIBUTION, 20.0),
)


def goal_of(key: str) -> Goal | None:
    return next((g for g in GOALS if key in g.keys), None)


class GroupMeter(procs.Meter):
    """CPU and peak memory of several process trees together (replicas, balancer)."""

    def __init__(self, roots: Sequence[int]) -> None:
        super().__init__(roots[0])
        self.roots = list(roots)

    def start(self) -> None:
        self.hwm_reset = all([procs.reset_peak_rss(root) for root in self.roots])
        self._cpu = sum(procs.cpu_seconds(root) for root in self.roots)

    def stop(self) -> procs.Usage:
        return procs.Usage(
            sum(procs.cpu_seconds(root) for root in self.roots) - self._cpu,
            sum(procs.peak_rss_mib(root) for root in self.roots),
        )


class StoreMeter(procs.Meter):
    """A setup's meter that also takes the object store's CPU over the same phase."""

    def __init__(self, inner: procs.Meter, store_pid: int) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.store_pid = store_pid
        self._store = 0.0

    def start(self) -> None:
        self.inner.start()
        self.hwm_reset = self.inner.hwm_reset
        self._store = procs.cpu_seconds(self.store_pid)

    def stop(self) -> procs.Usage:
        used = self.inner.stop()
        return replace(used, store_cpu_s=procs.cpu_seconds(self.store_pid) - self._store)


def _berth(
    workdir: Path, name: str, storage: Mapping[str, object], metadata: Mapping[str, object]
) -> procs.Server:
    home = workdir / name
    (home / "storage").mkdir(parents=True)
    port = procs.free_port()
    config: dict[str, object] = {
        "http": {"addr": f"127.0.0.1:{port}", "workers": 1},
        "storage": {"root": str(home / "storage"), **storage},
        "metadata": dict(metadata),
        "gc": {"interval_seconds": 0},
        "log": {"level": procs.LOG_LEVEL_BERTH, "format": "json"},
    }
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    # The config file decides; no BERTH_* setting of the caller's environment overrides it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_REPLICA_ID"] = name
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(procs.REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    argv = [sys.executable, "-m", "registry_server", "--config", str(home / "config.yaml")]
    return procs.Server(name, argv, home, port, env=env, cwd=procs.REPO_ROOT)


def _distribution(workdir: Path, binary: str, s3: Mapping[str, object]) -> procs.Server:
    home = workdir / DISTRIBUTION
    home.mkdir(parents=True)
    port = procs.free_port()
    config = procs.distribution_config(home / "unused", port)
    storage = dict(cast(dict[str, object], config["storage"]))
    storage.pop("filesystem")
    storage["s3"] = dict(s3)
    # Stream blobs through the registry, as Berth does (its default `redirect: false`).
    storage["redirect"] = {"disable": True}
    config["storage"] = storage
    (home / "config.yml").write_text(yaml.safe_dump(config))
    # With AWS_CA_BUNDLE set, the AWS SDK of distribution 2.8 panics at start ("unable to
    # load custom CA bundle, HTTPClient's transport unsupported type"); the store is plain
    # HTTP on loopback and needs no CA.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    argv = [binary, "serve", str(home / "config.yml")]
    return procs.Server(DISTRIBUTION, argv, home, port, env=env)


def _address(name: str, port: int, workdir: Path) -> procs.Server:
    """The one URL of a setup of several processes (its balancer's); never started here,
    its processes are measured by a GroupMeter."""
    return procs.Server(name, [], workdir, port)


@dataclass
class Setups:
    endpoints: dict[str, procs.Server]
    meters: dict[str, procs.Meter]
    processes: list[procs.Server]
    versions: dict[str, str]
    store: Any  # tests.support.s3_store.S3Store
    # Requests each replica of the two answered (from the balancer's access log).
    spread: Callable[[], dict[str, int]]


@contextmanager
def setups(workdir: Path, binary: str) -> Iterator[Setups]:
    """All four setups up, and everything they need; all stopped on leaving."""
    from tests.support import postgres
    from tests.support.balancer import Balancer
    from tests.support.s3_store import S3Store

    bin_dir = postgres.server_bin()
    if bin_dir is None:
        raise SystemExit("bench: PostgreSQL server missing (Debian postgresql); run `make tools`")
    with ExitStack() as stack:
        store = S3Store(workdir / "seaweedfs").start()
        stack.callback(store.stop)
        database = postgres.PostgresServer(bin_dir).start()
        stack.callback(database.stop)
        processes: list[procs.Server] = []

        def started(server: procs.Server) -> procs.Server:
            processes.append(server)
            stack.callback(server.stop)
            return server.start()

        fs = started(_berth(workdir, FS, {}, {"driver": "sqlite"}))
        # One registry of two replicas (one prefix, one database): one replica alone is
        # its first replica reached directly, two are both behind the balancer.
        shared = {"driver": "postgresql", "postgresql": {"dsn": database.create_database()}}
        replicas = [
            started(_berth(workdir, f"berth-s3-replica-{i}", store.server_config("berth"), shared))
            for i in (1, 2)
        ]
        upstreams = [f"127.0.0.1:{r.port}" for r in replicas]
        balancer = Balancer(workdir / "balancer", upstreams).start()
        stack.callback(balancer.stop)
        assert balancer.process is not None and balancer.process.pid is not None
        dist = started(
            _distribution(
                workdir,
                binary,
                {
                    "accesskey": store.access_key,
                    "secretkey": store.secret_key,
                    "region": store.region,
                    "regionendpoint": store.endpoint,
                    "bucket": store.bucket,
                    "rootdirectory": f"/{DISTRIBUTION}",
                    "secure": False,
                    "v4auth": True,
                },
            )
        )
        endpoints = {
            FS: fs,
            S3_ONE: replicas[0],
            S3_TWO: _address(S3_TWO, balancer.port, workdir),
            DISTRIBUTION: dist,
        }
        assert store.process is not None and store.process.pid is not None
        store_pid = store.process.pid
        meters: dict[str, procs.Meter] = {
            name: StoreMeter(meter, store_pid)
            for name, meter in {
                FS: procs.Meter(fs.pid),
                S3_ONE: procs.Meter(replicas[0].pid),
                S3_TWO: GroupMeter([replicas[0].pid, replicas[1].pid, balancer.process.pid]),
                DISTRIBUTION: procs.Meter(dist.pid),
                STORE: procs.Meter(store_pid),
            }.items()
        }
        weed = store.process.argv[0]
        versions = {
            "distribution": meta.first_line([binary, "--version"]),
            "seaweedfs": meta.first_line([weed, "version"]),
            "postgresql": meta.first_line([str(bin_dir / "postgres"), "--version"]),
            "nginx (balancer)": meta.first_line([str(procs.find_binary("nginx")), "-v"]),
        }
        try:
            yield Setups(
                endpoints, meters, processes, versions, store, balancer.requests_per_upstream
            )
        except BaseException:
            for server in processes:
                print(
                    f"--- {server.name} ({server.state()}) log, last lines ---\n"
                    f"{server.log_tail()}",
                    file=sys.stderr,
                )
            log = store.log_path.read_text(errors="replace") if store.log_path.exists() else ""
            print("--- SeaweedFS log ---", *log.splitlines()[-30:], sep="\n", file=sys.stderr)
            raise


def missing_tools() -> list[str]:
    from tests.support import postgres, tools

    missing = [name for name in ("weed", "nginx", "docker-registry") if not tools.find_tool(name)]
    if postgres.server_bin() is None:
        missing.append("postgresql")
    return missing


def direct_rows(bench: cli.Bench, store: Any) -> None:
    """The blob rows' jobs against the store itself (pre-signed PUT and GET of plain
    objects), added to the rows and phases as the `store-direct` column."""
    client = store.client(signature_version="s3v4")

    def url(method: str, key: str) -> str:
        params = {"Bucket": store.bucket, "Key": f"{DIRECT_PREFIX}/{key}"}
        return str(client.generate_presigned_url(method, Params=params, ExpiresIn=3600))

    large, regions = bench.s.large_bytes, bench._small_regions()
    last = bench.s.blob_reps - 1
    small_c = bench.s.blob_concurrency
    Jobs = Callable[[str, procs.Server, int], list[cli.Job]]

    def puts(named: Callable[[int], list[tuple[str, int, int]]], concurrency: int) -> Jobs:
        """PUTs of (key, offset, size) regions, new keys every repetition."""

        def jobs(name: str, server: procs.Server, rep: int) -> list[cli.Job]:
            targets = [[url("put_object", key), o, n] for key, o, n in named(rep)]
            return [
                {
                    "kind": "put",
                    "data": str(bench.data),
                    "puts": targets,
                    "nonce": bench._nonce(),
                    "concurrency": concurrency,
                }
            ]

        return jobs

    def gets(objects: list[tuple[str, int]], concurrency: int) -> Jobs:
        """GETs of what the last repetition of the PUTs wrote."""
        urls = [[url("get_object", key), n] for key, n in objects]
        return lambda name, server, rep: [
            {"kind": "pull", "urls": urls, "concurrency": concurrency}
        ]

    small = [(f"small-{last}-{i}", n) for i, (_, n) in enumerate(regions)]
    jobs = {
        "push_large": puts(lambda rep: [(f"large-{rep}", 0, large)], 1),
        "push_small": puts(
            lambda rep: [(f"small-{rep}-{i}", o, n) for i, (o, n) in enumerate(regions)], small_c
        ),
        "pull_large": gets([(f"large-{last}", large)], 1),
        "pull_small": gets(small, small_c),
    }
    servers = bench.servers
    bench.servers = {STORE: _address(STORE, store.port, bench.workdir)}
    try:
        for key in BLOB_ROWS:
            row = next(r for r in bench.rows if r.key == key)
            found = bench.measure(key, f"store direct: {row.label}", jobs[key], bench.s.blob_reps)
            samples = [cli.throughput(rs) for rs in found[STORE]]
            row.values[STORE] = max(samples)
            row.samples[STORE] = samples
            # One phase per row: the store's usage joins the registries' phase.
            measured = bench.phases.pop()
            phase = next(p for p in bench.phases if p["key"] == key)
            phase["servers"][STORE] = measured["servers"][STORE]
    finally:
        bench.servers = servers


DIRECT_PREFIX = "direct"


# The registries the tags and repositories are pushed into (the two Berth S3 setups are
# one registry).
SEEDED = (FS, S3_TWO, DISTRIBUTION)


def seed(bench: cli.Bench, endpoints: Mapping[str, procs.Server]) -> dict[str, Any]:
    """10,000 tags, then 10,000 repositories, pushed through the API into every registry
    at once (one client process each, populate_concurrency requests in flight),
    unmeasured but timed: the server section's populate jobs (one image under every tag;
    each repository made of two blob mounts and a manifest PUT). A repository without
    blobs would be cheaper to make, but distribution 2.8's catalog finds repositories by
    their `_layers` directory and would not list it."""
    out: dict[str, Any] = {"concurrency": bench.s.populate_concurrency}
    for kind, names in (
        ("populate_tags", bench.tag_names()),
        ("populate_repos", bench.repo_names()),
    ):
        started = time.monotonic()
        jobs = [
            {
                "kind": kind,
                "base": endpoints[name].base_url,
                "source": cli.TAGS_REPO,
                "names": names,
                "concurrency": bench.s.populate_concurrency,
            }
            for name in SEEDED
        ]
        results, _ = cli.run_clients(jobs, None)
        out[kind] = {
            name: {"count": len(names), "seconds": round(float(r["end"]) - float(r["start"]), 2)}
            for name, r in zip(SEEDED, results, strict=True)
        }
        print(
            f"  {kind}: {len(names):,} into each at once, {time.monotonic() - started:.1f} s: "
            + ", ".join(f"{n} {v['seconds']:.1f} s" for n, v in out[kind].items()),
            file=sys.stderr,
            flush=True,
        )
    return out


def measure(settings: cli.Settings, workdir: Path, binary: str) -> Result:
    loads: list[float] = []
    with setups(workdir, binary) as up:
        data = workdir / "www" / "blob.bin"
        limits.make_data_file(data, settings.large_bytes)
        bench = cli.Bench(settings, workdir, up.endpoints, S3_ONE, DISTRIBUTION, up.meters)
        seeding: dict[str, Any] = {}

        def lists() -> None:
            bench.tag_list()
            # distribution walks the bucket for every catalog request (seconds at 10,000
            # repositories): one repetition of the catalog rows.
            bench.s = replace(bench.s, reps=1)
            bench.catalog()

        steps: list[tuple[str, Callable[[], None]]] = [
            ("push_large", bench.push_large),
            ("push_small", bench.push_small),
            ("pull_large", lambda: bench.pull_large(None)),
            ("pull_small", bench.pull_small),
            ("store_direct", lambda: direct_rows(bench, up.store)),
            ("seed", lambda: seeding.update(seed(bench, up.endpoints))),
            ("manifests", bench.manifests),
            ("lists", lists),
        ]
        for phase, step in steps:
            loads.append(meta.load())
            print(f"bench: scale-out {phase}", file=sys.stderr, flush=True)
            step()
        spread = up.spread()
        versions = up.versions
    return {
        "settings": asdict(settings),
        "versions": versions,
        "columns": list(COLUMNS),
        "headings": HEADINGS,
        "rows": [asdict(row) for row in bench.rows],
        "goals": goal_table([asdict(row) for row in bench.rows]),
        "phases": bench.phases,
        "seeding": seeding,
        "requests_per_replica_of_two": spread,
        "load_at_phase_starts": [round(x, 2) for x in loads],
    }


def _ratio(row: Mapping[str, Any], ours: str, theirs: str) -> float | None:
    a, b = row["values"].get(ours), row["values"].get(theirs)
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return float(a) / float(b)


def goal_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each goal row: the ratio of each Berth S3 setup to what it is held to, and whether
    it meets the goal."""
    out = []
    for row in rows:
        goal = goal_of(str(row["key"]))
        if goal is None:
            continue
        ratios = {name: _ratio(row, name, goal.versus) for name in BERTH_S3}
        entry = {
            "key": row["key"],
            "label": row["label"],
            "versus": goal.versus,
            "at_least": goal.at_least,
            "ratios": ratios,
            "met": {n: r is not None and r >= goal.at_least for n, r in ratios.items()},
        }
        if row["key"] in BLOB_ROWS:
            # What bounds these rows: the store alone, and what it allows of the goal.
            entry["of_store"] = {name: _ratio(row, name, STORE) for name in BERTH_S3}
            entry["store_vs_goal"] = _ratio(row, STORE, goal.versus)
        out.append(entry)
    return out


# --- the section ------------------------------------------------------------------------


def run_section(args: argparse.Namespace) -> Result:
    settings = QUICK if args.quick else SETTINGS
    if args.reps is not None:
        settings = replace(settings, reps=args.reps, blob_reps=args.reps)
    missing = missing_tools()
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} missing; run `make tools`")
    binary = args.distribution_bin or procs.find_binary("docker-registry") or ""
    print("bench: scale-out section", file=sys.stderr, flush=True)
    started, load_before = time.monotonic(), meta.load()
    with meta.scratch("scale-out", args.workdir, args.keep) as workdir:
        figures = measure(settings, workdir, binary)
    paths = ("registry_server", "bench")
    result = {
        **meta.envelope("scale-out", paths, started, load_before, meta.machine(workdir)),
        "note": args.note or "",
        **figures,
    }
    loads = figures["load_at_phase_starts"]
    result["machine"]["load average (1 min) at the phases' starts"] = (
        f"{min(loads):.1f} to {max(loads):.1f}"
    )
    print(markdown(result), file=sys.stderr)
    return result


# --- docs -------------------------------------------------------------------------------


def _goal_cell(ratio: float | None, goal: Goal) -> str:
    if ratio is None:
        return "-"
    shown = f"{ratio:.2f}" if ratio < 10 else f"{ratio:.0f}"
    return shown + (" ✓" if ratio >= goal.at_least else " ✗")


def markdown(result: Result) -> str:
    """The scale-out section of docs/benchmarks.md (between its markers)."""
    columns: list[str] = result["columns"]
    headings: dict[str, str] = result["headings"]
    header = ["metric", "unit", *(headings[c] for c in columns), "goal"]
    header += [f"{headings[n]}: ratio" for n in BERTH_S3]
    # Results saved before the store was measured have no such column.
    direct = STORE in columns
    if direct:
        header += [f"{headings[n]} / {headings[STORE]}" for n in BERTH_S3]
    body = []
    for row in result["rows"]:
        unit = row["unit"] + (" ↑" if row["higher_is_better"] else " ↓")
        cells = [row["label"], unit, *(report.fmt(row["values"].get(c)) for c in columns)]
        goal = goal_of(row["key"])
        if goal is None:
            cells += ["", *("" for _ in BERTH_S3)]
        else:
            cells.append(goal.describe())
            cells += [_goal_cell(_ratio(row, n, goal.versus), goal) for n in BERTH_S3]
        if direct:
            bound = [_ratio(row, n, STORE) if row["key"] in BLOB_ROWS else None for n in BERTH_S3]
            cells += ["" if r is None else f"{r:.2f}" for r in bound]
        body.append(cells)
    met = [g for g in result["goals"] if all(g["met"].values())]
    s = result["settings"]
    settings = (
        f"blob rows {s['blob_reps']} repetitions, request rows {s['reps']} (each until"
        f" {s['manifest_requests']:,} requests or {s['request_seconds']:g} s), manifest"
        f" c={s['manifest_concurrency']}, lists c={s['list_concurrency']} (the catalog rows"
        " one repetition)"
    )
    seeding = result["seeding"]
    seeded = "; ".join(
        f"{what} into each: "
        + ", ".join(
            f"{headings[n]} {v['seconds']:.0f} s" for n, v in seeding[f"populate_{kind}"].items()
        )
        for kind, what in (
            ("tags", f"{s['tags']:,} tags"),
            ("repos", f"then {s['repos']:,} repositories"),
        )
    )
    spread = ", ".join(f"{v:,}" for _, v in sorted(result["requests_per_replica_of_two"].items()))
    parts = report.saved_run_header(result, "scale-out", "scale_out.json")
    parts += [
        f"Settings: {settings}. Each value is the best of its repetitions (all samples are"
        " in the JSON). ↑ higher is better, ↓ lower is better. Goal ratios: a Berth S3"
        " setup's value over the value it is held to (✓ goal met, ✗ not met).",
        "",
        report._markdown(header, body),
        "",
        f"Goals met by both Berth S3 setups: {len(met)} of {len(result['goals'])} rows."
        f" Seeding through the API, the three registries at once, c={seeding['concurrency']}"
        f" each: {seeded}. Requests each of the two replicas answered through the"
        f" balancer over the run: {spread}.",
        "",
        *(_direct_lines(result) if direct else ()),
        "Server CPU seconds per phase (median of the repetitions) and peak RSS (summed over"
        " the setup's registry processes, and the balancer for two replicas), then the"
        " store's CPU seconds over the same phase:",
        "",
        _phase_table(result),
    ]
    return "\n".join(parts) + "\n"


def _direct_lines(result: Result) -> tuple[str, str]:
    share = {key: _store_share(result, key) for key in BLOB_ROWS}
    return (
        f"{result['headings'][STORE]} is the store alone, the same jobs as pre-signed PUTs"
        " and GETs of plain objects (measured after the registries' rounds): the most any"
        " registry on this store can reach here. Its value over Berth on the filesystem,"
        f" push: {share['push_large']} (one blob), {share['push_small']} (many); pull:"
        f" {share['pull_large']}, {share['pull_small']}.",
        "",
    )


def _store_share(result: Result, key: str) -> str:
    row = next((r for r in result["rows"] if r["key"] == key), None)
    ratio = None if row is None else _ratio(row, STORE, FS)
    return "-" if ratio is None else f"{ratio:.2f}"


def _phase_table(result: Result) -> str:
    columns: list[str] = result["columns"]
    header = [
        "phase",
        *(f"{result['headings'][c]}: CPU s / peak RSS MiB / store CPU s" for c in columns),
    ]
    body = []
    for phase in result["phases"]:
        cells = [str(phase["label"])]
        for c in columns:
            usage = phase["servers"].get(c)
            if usage is None:
                cells.append("-")
                continue
            store = usage.get("store_cpu_s")
            cells.append(
                f"{usage['cpu_s']:.2f} / {report.fmt(usage['peak_rss_mib'])}"
                + ("" if store is None or c == STORE else f" / {store:.2f}")
            )
        body.append(cells)
    return report._markdown(header, body)
