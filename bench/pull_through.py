"""Pull-through cache: pulls through Berth from an upstream, beside the same pulls
directly from that upstream, from Berth with the image pushed into it, and through CNCF
distribution's own proxy mode (issue 14).

One run on this machine, every server on loopback:

- `upstream`: CNCF distribution 2.8 (Debian `docker-registry`), filesystem storage,
  holding the images; pulled directly it is the reference of first pulls;
- `berth`: one Berth process (one worker, GC off) with the images pushed into it: the
  reference of cached pulls;
- `berth-mirror`: one Berth process (one worker, GC off) mirroring the upstream under the
  prefix `mirror` (`upstreams:` in its config), with a new storage root every repetition;
- `proxy`: distribution 2.8 in proxy mode (`proxy: remoteurl:` the upstream), with new
  storage every repetition.

The client is `skopeo copy docker://... oci:<dir>` into an OCI layout on tmpfs
(/dev/shm, removed after each pull), timed from its start to its exit, so skopeo's
start-up and its own work are in every time alike. Each repetition starts a new mirror
and proxy and pulls a tiny image through each (unmeasured: a cache that has filled
something before), then pulls every image directly from the upstream, from `berth`, then
first through the mirror and the proxy
(which goes first alternating between repetitions), then again through both (cached).
Then the bench's own client (bench/client.py, raw HTTP/1.1, one connection per blob)
GETs the blobs of a third image of the same size by digest the same ways: the servers'
blob throughput without skopeo. A figure is the median of the repetitions; server CPU
is the process tree's (procs.Meter) over each pull, the front server's and, for pulls
through a cache, the upstream's.

`python -m bench --only pull-through` saves bench/results/pull_through.json; its table
goes into docs/pull-through-cache.md ("Measured") through bench/docs.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench import cli, limits, meta, procs, report

Result = dict[str, Any]
MiB = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Layers are tars of random bytes in gzip's stored blocks (level 0): nothing a client
# would compress on pushing (skopeo gzips an uncompressed layer), no time spent
# compressing random bytes, and the size is the content's.
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PREFIX = "mirror"
TAG = "v1"


@dataclass(frozen=True)
class Settings:
    reps: int = 7
    large_layers: int = 4
    large_layer_bytes: int = 64 * MiB
    small_layers: int = 64
    small_layer_bytes: int = 1 * MiB
    skopeo_timeout_s: float = 300.0


QUICK = Settings(
    reps=1, large_layers=2, large_layer_bytes=2 * MiB, small_layers=4, small_layer_bytes=64 * 1024
)


# --- the paths a pull takes ---------------------------------------------------------------

UPSTREAM = "upstream"
BERTH = "berth"
BERTH_FIRST = "berth-first"
BERTH_CACHED = "berth-cached"
PROXY_FIRST = "proxy-first"
PROXY_CACHED = "proxy-cached"
PATHS = (UPSTREAM, BERTH_FIRST, BERTH_CACHED, BERTH, PROXY_FIRST, PROXY_CACHED)
LABELS = {
    UPSTREAM: "upstream (distribution), direct",
    BERTH_FIRST: "Berth cache, first pull",
    BERTH_CACHED: "Berth cache, cached pull",
    BERTH: "Berth, image pushed into it",
    PROXY_FIRST: "distribution proxy, first pull",
    PROXY_CACHED: "distribution proxy, cached pull",
}
SHORT = {UPSTREAM: "upstream, direct", BERTH: "Berth, pushed"}
# Pulls through a cache also cost the upstream CPU while it fills.
FILLS = (BERTH_FIRST, PROXY_FIRST)


@dataclass(frozen=True)
class Compare:
    """A row's time over ``versus``'s; with ``at_most``, the issue's goal for it."""

    versus: str
    at_most: float | None = None
    approx: bool = False

    def goal(self) -> str:
        if self.at_most is None:
            return "(comparison)"
        return f"≈ 1.0 x (≤ {self.at_most:g})" if self.approx else f"≤ {self.at_most:g} x"


COMPARE = {
    BERTH_FIRST: Compare(UPSTREAM, 1.1),
    BERTH_CACHED: Compare(BERTH, 1.05, approx=True),
    PROXY_FIRST: Compare(UPSTREAM),
    PROXY_CACHED: Compare(UPSTREAM),
}
# The goals are on the image pulls (skopeo); the raw blob GETs show the servers'
# throughput without the client, compared but not held to them.
RAW = "blobs"


def compare(image: str, path: str) -> Compare | None:
    c = COMPARE.get(path)
    return replace(c, at_most=None, approx=False) if c is not None and image == RAW else c


# Berth's pull-through rows beside distribution's proxy doing the same.
PEERS = {BERTH_FIRST: PROXY_FIRST, BERTH_CACHED: PROXY_CACHED}


# --- images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    key: str
    repo: str
    layers: int
    layer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes

    def label(self) -> str:
        return f"{self.layers} x {_size(self.layer_bytes)}"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // 1024} KiB"


# Pulled once through each new cache before its measured pulls (a server that has
# filled something before, its client to the upstream set up): not measured.
WARM = Image("warm", "bench/warm", 1, 64 * 1024)


def images(s: Settings) -> tuple[Image, Image, Image]:
    """The two images pulled with skopeo and the one whose blobs the raw client GETs
    (as large as the first, other bytes, so that its first GETs fill the cache)."""
    return (
        Image("large", "bench/large", s.large_layers, s.large_layer_bytes),
        Image("small", "bench/small", s.small_layers, s.small_layer_bytes),
        Image(RAW, "bench/blobs", s.large_layers, s.large_layer_bytes),
    )


class _GzipLayer:
    """A layer file: what is written goes in gzip stored blocks, both the tar's digest
    (the diff ID) and the file's taken on the way."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("wb")
        self.gzip = zlib.compressobj(level=0, wbits=31)
        self.tar = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0

    def _out(self, data: bytes) -> None:
        self.blob.update(data)
        self.size += len(data)
        self.f.write(data)

    def write(self, data: bytes) -> None:
        self.tar.update(data)
        self._out(self.gzip.compress(data))

    def close(self) -> None:
        self._out(self.gzip.flush())
        self.f.close()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, image: Image) -> list[tuple[str, int]]:
    """An OCI image layout of ``image`` tagged ``TAG``: each layer a tar of one file of
    random bytes (``layer_bytes`` is the tar's size). Returns the layers' digests and
    sizes."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for i in range(image.layers):
        # The tar's payload: the layer's size less the header and the end-of-archive blocks.
        payload = image.layer_bytes - 3 * tarfile.BLOCKSIZE
        info = tarfile.TarInfo(f"data-{i}.bin")
        info.size, info.mtime, info.mode = payload, 0, 0o644
        tmp = blobs / "tmp"
        out = _GzipLayer(tmp)
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for pos in range(0, payload, MiB):
            out.write(os.urandom(min(MiB, payload - pos)))
        out.write(b"\0" * (-payload % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
        out.close()
        digest = out.blob.hexdigest()
        tmp.rename(blobs / digest)
        layers.append({"mediaType": OCI_LAYER, "digest": f"sha256:{digest}", "size": out.size})
        diff_ids.append(f"sha256:{out.tar.hexdigest()}")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, **_put_blob(layout, config)},
            "layers": layers,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **_put_blob(layout, manifest),
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return [(str(layer["digest"]), int(layer["size"])) for layer in layers]


# --- servers --------------------------------------------------------------------------------


def _berth(home: Path, upstream: str | None) -> procs.Server:
    """One Berth process, one worker, GC off; mirroring ``upstream`` under PREFIX."""
    (home / "storage").mkdir(parents=True)
    port = procs.free_port()
    config: dict[str, object] = {
        "http": {"addr": f"127.0.0.1:{port}", "workers": 1},
        "storage": {"root": str(home / "storage")},
        "gc": {"interval_seconds": 0},
        "log": {"level": procs.LOG_LEVEL_BERTH, "format": "json"},
    }
    if upstream is not None:
        config["upstreams"] = [{"name": "bench", "url": upstream, "prefix": PREFIX}]
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    # The config file decides; no BERTH_* setting of the caller's environment overrides it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(procs.REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    argv = [sys.executable, "-m", "registry_server", "--config", str(home / "config.yaml")]
    return procs.Server(home.name, argv, home, port, env=env, cwd=procs.REPO_ROOT)


def _proxy(home: Path, binary: str, upstream: str) -> procs.Server:
    """distribution in proxy mode: its stock settings plus `proxy: remoteurl:`."""
    (home / "storage").mkdir(parents=True)
    port = procs.free_port()
    config = procs.distribution_config(home / "storage", port)
    config["proxy"] = {"remoteurl": upstream}
    (home / "config.yml").write_text(yaml.safe_dump(config))
    return procs.Server(home.name, [binary, "serve", str(home / "config.yml")], home, port)


@contextmanager
def _running(servers: list[procs.Server]) -> Iterator[None]:
    """Start them; stop them on leaving, with their logs' tails when something failed."""
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        try:
            yield
        except BaseException:
            for server in servers:
                print(
                    f"--- {server.name} ({server.state()}) log, last lines ---\n"
                    f"{server.log_tail()}",
                    file=sys.stderr,
                )
            raise


# --- the client -----------------------------------------------------------------------------


class PullError(RuntimeError):
    pass


@dataclass
class Sample:
    seconds: float
    cpu_s: float
    upstream_cpu_s: float
    peak_rss_mib: float
    client_cpu_s: float | None = None  # skopeo's (not the raw client's: its start-up is in it)


class Puller:
    def __init__(self, s: Settings, scratch: Path, skopeo: str, upstream: procs.Server) -> None:
        self.s = s
        self.scratch = scratch
        self.skopeo = skopeo
        self.upstream = upstream
        self.count = 0

    def _meters(self, front: procs.Server) -> tuple[procs.Meter, procs.Meter | None]:
        up = None if front is self.upstream else procs.Meter(self.upstream.pid)
        return procs.Meter(front.pid), up

    def skopeo_pull(self, front: procs.Server, repo: str) -> Sample:
        self.count += 1
        dest = self.scratch / f"pull-{self.count}"
        argv = [
            self.skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{front.port}/{repo}:{TAG}",
            f"oci:{dest}:{TAG}",
        ]
        meter, up = self._meters(front)
        meter.start()
        if up is not None:
            up.start()
        # skopeo's: the only child that ends meanwhile (one runs at a time).
        started, client_cpu = time.monotonic(), procs.own_cpu_seconds(children_only=True)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self.s.skopeo_timeout_s)
        seconds = time.monotonic() - started
        client_cpu = procs.own_cpu_seconds(children_only=True) - client_cpu
        used = meter.stop()
        upstream_cpu = up.stop().cpu_s if up is not None else 0.0
        shutil.rmtree(dest, ignore_errors=True)
        if done.returncode != 0:
            raise PullError(f"skopeo copy from {front.name}/{repo}: {done.stderr[-2000:]}")
        return Sample(seconds, used.cpu_s, upstream_cpu, used.peak_rss_mib, client_cpu)

    def blob_get(self, front: procs.Server, repo: str, layers: list[tuple[str, int]]) -> Sample:
        """The raw client GETs every layer by digest, one connection each."""
        urls = [[f"{front.base_url}/v2/{repo}/blobs/{d}", size] for d, size in layers]
        job = {"kind": "pull", "urls": urls, "concurrency": len(urls)}
        meter, up = self._meters(front)
        if up is not None:
            up.start()
        results, used = cli.run_clients([job], meter)
        upstream_cpu = up.stop().cpu_s if up is not None else 0.0
        seconds = float(results[0]["end"]) - float(results[0]["start"])
        return Sample(seconds, used.cpu_s, upstream_cpu, used.peak_rss_mib)


def _push(skopeo: str, layout: Path, server: procs.Server, repo: str) -> None:
    subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:{TAG}",
            f"docker://127.0.0.1:{server.port}/{repo}:{TAG}",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )


def _scratch_dir(workdir: Path) -> Path:
    """Where skopeo writes its layouts: tmpfs when there is room, so that the client's
    disk writes are not in the servers' times."""
    shm = Path("/dev/shm")
    try:
        if shutil.disk_usage(shm).free > 2 << 30:
            return Path(tempfile.mkdtemp(prefix="berth-bench-pull-through-", dir=shm))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="pulls-", dir=workdir))


def measure(s: Settings, workdir: Path, binary: str, skopeo: str) -> Result:
    large, small, blobs = images(s)
    samples: dict[str, dict[str, list[Sample]]] = {
        i.key: {p: [] for p in PATHS} for i in (large, small, blobs)
    }
    loads: list[float] = []
    # What a fill costs beyond a plain pull, measured at every repetition's start: the
    # cache hashes each layer and writes it with an fsync before the last chunk goes out.
    sha256: list[float] = []
    disk: list[float] = []
    data = workdir / "data.bin"
    limits.make_data_file(data, s.large_layer_bytes)
    scratch = _scratch_dir(workdir)
    upstream = procs.distribution(workdir, binary)
    berth = _berth(workdir / "berth", None)
    try:
        with _running([upstream, berth]):
            started = time.monotonic()
            digests: dict[str, list[tuple[str, int]]] = {}
            for image in (large, small, blobs, WARM):
                layout = workdir / "layouts" / image.key
                digests[image.key] = write_layout(layout, image)
                for server in (upstream, berth):
                    _push(skopeo, layout, server, image.repo)
                shutil.rmtree(layout)
            print(
                f"  images made and pushed: {time.monotonic() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            puller = Puller(s, scratch, skopeo, upstream)
            for rep in range(s.reps):
                loads.append(meta.load())
                started = time.monotonic()
                sha256.append(limits.sha256_mbps(data, s.large_layer_bytes))
                disk.append(limits.disk_write_mbps(data, workdir / "dd.tmp", s.large_layer_bytes))
                mirror = _berth(workdir / f"berth-mirror-{rep}", upstream.base_url)
                proxy = _proxy(workdir / f"proxy-{rep}", binary, upstream.base_url)
                with _running([mirror, proxy]):
                    # Which cache fills first alternates between repetitions.
                    caches = [
                        (mirror, BERTH_FIRST, BERTH_CACHED),
                        (proxy, PROXY_FIRST, PROXY_CACHED),
                    ]
                    if rep % 2:
                        caches.reverse()
                    fronts = {UPSTREAM: upstream, BERTH: berth}
                    for cache, first, cached in caches:
                        fronts[first] = fronts[cached] = cache
                    order = [UPSTREAM, BERTH, *(c[1] for c in caches), *(c[2] for c in caches)]
                    puller.skopeo_pull(mirror, f"{PREFIX}/{WARM.repo}")
                    puller.skopeo_pull(proxy, WARM.repo)

                    def repo(path: str, image: Image) -> str:
                        through_berth = path in (BERTH_FIRST, BERTH_CACHED)
                        return f"{PREFIX}/{image.repo}" if through_berth else image.repo

                    for image in (large, small):
                        for path in order:
                            sample = puller.skopeo_pull(fronts[path], repo(path, image))
                            samples[image.key][path].append(sample)
                    for path in order:
                        sample = puller.blob_get(
                            fronts[path], repo(path, blobs), digests[blobs.key]
                        )
                        samples[blobs.key][path].append(sample)
                for home in (mirror.workdir, proxy.workdir):
                    shutil.rmtree(home, ignore_errors=True)
                print(
                    f"  repetition {rep + 1}/{s.reps}: {time.monotonic() - started:.1f} s; "
                    + ", ".join(f"{p} {samples[large.key][p][-1].seconds:.2f}" for p in PATHS),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "settings": asdict(s),
        "images": [
            {**asdict(i), "total_bytes": i.total_bytes, "label": i.label()}
            for i in (large, small, blobs)
        ],
        "scratch": "tmpfs" if str(scratch).startswith("/dev/shm") else "workdir",
        "pulls": {
            key: {path: _summary(values) for path, values in by_path.items()}
            for key, by_path in samples.items()
        },
        "limits": {
            "sha256_mb_s": [round(x, 1) for x in sha256],
            "disk_write_fsync_mb_s": [round(x, 1) for x in disk],
        },
        "load_at_repetitions": [round(x, 2) for x in loads],
        "cores": os.cpu_count() or 1,
    }


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _summary(values: Sequence[Sample]) -> dict[str, Any]:
    seconds = [round(v.seconds, 4) for v in values]
    client = [v.client_cpu_s for v in values if v.client_cpu_s is not None]
    return {
        "median_s": round(_median(seconds), 4),
        "samples_s": seconds,
        "cpu_s": round(_median([v.cpu_s for v in values]), 3),
        "upstream_cpu_s": round(_median([v.upstream_cpu_s for v in values]), 3),
        "peak_rss_mib": round(max(v.peak_rss_mib for v in values), 1),
        **({"client_cpu_s": round(_median(client), 3)} if len(client) == len(values) else {}),
    }


# --- the section ------------------------------------------------------------------------


def run_section(args: argparse.Namespace) -> Result:
    settings = QUICK if args.quick else Settings()
    if args.reps is not None:
        settings = replace(settings, reps=args.reps)
    binary = args.distribution_bin or procs.find_binary("docker-registry") or ""
    skopeo = procs.find_binary("skopeo") or ""
    missing = [name for name, path in (("docker-registry", binary), ("skopeo", skopeo)) if not path]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} missing; run `make tools`")
    print("bench: pull-through section", file=sys.stderr, flush=True)
    started, load_before = time.monotonic(), meta.load()
    with meta.scratch("pull-through", args.workdir, args.keep) as workdir:
        figures = measure(settings, workdir, binary, skopeo)
        machine = meta.machine(workdir)
    loads = figures["load_at_repetitions"]
    paths = ("registry_server", "bench")
    result = {
        **meta.envelope("pull-through", paths, started, load_before, machine),
        "versions": {
            "distribution": meta.first_line([binary, "--version"]),
            "skopeo": meta.first_line([skopeo, "--version"]),
        },
        "note": args.note or "",
        **figures,
    }
    result["machine"]["load average (1 min) at the repetitions' starts"] = (
        f"{min(loads):.1f} to {max(loads):.1f}"
    )
    print(markdown(result), file=sys.stderr)
    return result


# --- docs -------------------------------------------------------------------------------


def _ratio(by_path: Mapping[str, Any], path: str, versus: str) -> float | None:
    a, b = by_path[path]["median_s"], by_path[versus]["median_s"]
    return float(a) / float(b) if a > 0 and b > 0 else None


def _ratio_cell(ratio: float | None, at_most: float | None) -> str:
    if ratio is None:
        return "-"
    if at_most is None:
        return f"{ratio:.2f}"
    return f"{ratio:.2f}" + (" ✓" if ratio <= at_most else " ✗")


def _cpu_cell(path: str, summary: Mapping[str, Any]) -> str:
    cpu = f"{summary['cpu_s']:.2f}"
    return cpu + (f" + {summary['upstream_cpu_s']:.2f}" if path in FILLS else "")


def goals(result: Result) -> list[dict[str, Any]]:
    out = []
    for image in result["images"]:
        by_path = result["pulls"][image["key"]]
        for path in COMPARE:
            c = compare(image["key"], path)
            if c is None or c.at_most is None:
                continue
            ratio = _ratio(by_path, path, c.versus)
            out.append(
                {
                    "image": image["key"],
                    "path": path,
                    "ratio": ratio,
                    "met": ratio is not None and ratio <= c.at_most,
                }
            )
    return out


def _table(result: Result) -> str:
    header = [
        "image",
        "pull",
        "time (median)",
        "min, max",
        "MB/s",
        "over",
        "ratio",
        "goal",
        "Berth / distribution's proxy",
        "server CPU s",
        "skopeo CPU s",
        "peak RSS MiB",
    ]
    body = []
    for image in result["images"]:
        by_path = result["pulls"][image["key"]]
        how = "skopeo" if image["key"] != RAW else "raw GETs"
        for path in PATHS:
            summary = by_path[path]
            c = compare(image["key"], path)
            peer = PEERS.get(path)
            samples = summary["samples_s"]
            body.append(
                [
                    f"{image['label']} ({how})",
                    LABELS[path],
                    f"{summary['median_s']:.2f} s",
                    f"{min(samples):.2f}, {max(samples):.2f}",
                    report.fmt(image["total_bytes"] / summary["median_s"] / 1e6),
                    "" if c is None else SHORT[c.versus],
                    "" if c is None else _ratio_cell(_ratio(by_path, path, c.versus), c.at_most),
                    "" if c is None else c.goal(),
                    "" if peer is None else _ratio_cell(_ratio(by_path, path, peer), None),
                    _cpu_cell(path, summary),
                    f"{summary['client_cpu_s']:.2f}" if "client_cpu_s" in summary else "",
                    report.fmt(summary["peak_rss_mib"]),
                ]
            )
    return report._markdown(header, body)


def _bounds(result: Result) -> list[str]:
    """What the machine's cores allow a first pull through a cache, per skopeo image:
    the direct pull's CPU (skopeo's and the upstream's) plus what the cache adds, spread
    over every core, is the least time the pull can take however well it overlaps."""
    cores = result.get("cores")
    sha256 = _median(result["limits"]["sha256_mb_s"]) * 1e6
    out = []
    for image in result["images"]:
        by_path = result["pulls"][image["key"]]
        direct, first = by_path[UPSTREAM], by_path[BERTH_FIRST]
        if not cores or "client_cpu_s" not in direct or "client_cpu_s" not in first:
            continue
        t = direct["median_s"]
        work = direct["client_cpu_s"] + direct["cpu_s"]
        hashing = image["total_bytes"] / sha256
        through = first["client_cpu_s"] + first["upstream_cpu_s"] + first["cpu_s"]
        least_any, least = max(t, (work + hashing) / cores), max(t, through / cores)
        out.append(
            f"- {image['label']}: pulled directly, skopeo and the upstream keep"
            f" {work / t:.1f} of the {cores} cores busy ({work:.2f} s of CPU in {t:.2f} s)."
            f" Through the cache they use {through - first['cpu_s']:.2f} s and Berth"
            f" {first['cpu_s']:.2f} s, so the pull cannot take less than {least:.2f} s"
            f" ({least / t:.2f} x the direct pull; measured {first['median_s'] / t:.2f} x)."
            + (
                f" A cache that verifies what it stores adds at least the hashing of every"
                f" byte, {hashing:.2f} s here: {least_any:.2f} s ({least_any / t:.2f} x)."
                if least_any > t
                else ""
            )
        )
    if out:
        out.insert(
            0,
            "What the cores allow a first pull through the cache: the CPU it takes (the"
            " sum of each process's median) over the cores, however well the processes"
            " overlap, and never less than the direct pull:",
        )
    return out


def markdown(result: Result) -> str:
    """The Measured section of docs/pull-through-cache.md (between its markers)."""
    s = result["settings"]
    met = [g for g in goals(result) if g["met"]]
    where = "tmpfs (/dev/shm)" if result["scratch"] == "tmpfs" else "the scratch directory"
    parts = report.saved_run_header(result, "pull-through", "pull_through.json")
    parts += [
        f"{s['reps']} repetitions, each with a new cache (Berth storage root, distribution"
        " proxy storage) that has filled a tiny image before (unmeasured); skopeo writes"
        f" into an OCI layout on {where}. Times are medians"
        " (lower is better); ratio: the row's time over the time of the row named in"
        " *over* (✓ goal met, ✗ not met); Berth / distribution's proxy: Berth's time over"
        " the proxy's for the same pull. Server CPU: the front server's, median, plus the"
        " upstream's while a cache fills from it; skopeo CPU: the client's, median.",
        "",
        _table(result),
        "",
        f"Goals met: {len(met)} of {len(goals(result))}. The machine's limits on a fill's"
        " path, at each repetition's start (median): hashlib sha256"
        f" {_median(result['limits']['sha256_mb_s']):.0f} MB/s; writing"
        f" {_size(s['large_layer_bytes'])} and fsync (dd-like)"
        f" {_median(result['limits']['disk_write_fsync_mb_s']):.0f} MB/s.",
    ]
    bounds = _bounds(result)
    if bounds:
        parts += ["", *bounds]
    return "\n".join(parts) + "\n"
