"""Pushes and pulls with three kinds of client: ``python -m bench --only clients``.

Berth and CNCF distribution 2.8 on this machine, the same loads, each client in turn:

- **curl**: one process per blob. A push is a POST (the upload's location) and a
  monolithic PUT of the file with its Content-Length (``curl -T``); a pull is a GET to
  /dev/null. The 64-blob cases run 8 curl processes at a time.
- **crane** (go-containerregistry, the library behind ko, skaffold and many CI tools):
  ``crane push`` of an OCI image layout (one 256 MiB layer, or 64 layers of 1 MiB) and
  ``crane pull --format oci`` of it into a new layout, which writes the layers to disk as
  a client pulling an image does. crane moves 4 blobs at a time (its fixed default).
- **python**: the harness of the server section (bench/client.py): aiohttp streaming
  1 MiB slices with a Content-Length, 8 at a time in the 64-blob cases.

Every round pushes new content (a nonce in each blob), so no server skips a blob it
already has. Reported per cell: MB/s (the best of the rounds, as the server section), the
server's CPU seconds, and, when the kernel keeps delay accounting, the seconds its
threads waited for block I/O (``delayacct_blkio_ticks``; the section turns
``kernel.task_delayacct`` on for its run when it runs as root, and back off after).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import page_cache, procs

MiB = 1 << 20
CLIENTS = ("curl", "crane", "python")
CASES = ("push_large", "push_small", "pull_large", "pull_small")
CONCURRENCY = 8
DELAYACCT = Path("/proc/sys/kernel/task_delayacct")


@dataclass(frozen=True)
class Settings:
    large_mib: int = 256
    small_count: int = 64
    small_mib: int = 1
    # Five: with three, a cell's best moved by a third between runs of the same code
    # (crane's 64-blob push 1.38x in one run, 1.61-1.83x over eight rounds after it).
    rounds: int = 5


QUICK = Settings(large_mib=4, small_count=4, small_mib=1, rounds=1)


# -- content -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str
    size: int


def _write_blob(path: Path, size: int, nonce: str) -> Blob:
    """``size`` bytes unlike any other blob of the run (a nonce at the start)."""
    h = hashlib.sha256()
    block = os.urandom(MiB)
    with path.open("wb") as f:
        head = nonce.encode().ljust(64, b"\0")
        written = 0
        while written < size:
            chunk = (head + block[64:]) if written == 0 else block
            chunk = chunk[: size - written]
            f.write(chunk)
            h.update(chunk)
            written += len(chunk)
    return Blob(path, "sha256:" + h.hexdigest(), size)


def _json_blob(directory: Path, document: dict[str, Any]) -> Blob:
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = directory / "blobs" / "sha256" / digest[7:]
    path.write_bytes(data)
    return Blob(path, digest, len(data))


def make_image(directory: Path, count: int, size: int, nonce: str) -> list[Blob]:
    """An OCI image layout of ``count`` layers of ``size`` bytes; returns the layers."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    layers = []
    for i in range(count):
        staged = _write_blob(directory / f"layer-{i}", size, f"{nonce}-{i}")
        final = blobs_dir / staged.digest[7:]
        staged.path.rename(final)
        layers.append(Blob(final, staged.digest, size))
    config = _json_blob(directory, {"architecture": "amd64", "os": "linux", "nonce": nonce})
    manifest = _json_blob(
        directory,
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest,
                "size": config.size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": b.digest,
                    "size": b.size,
                }
                for b in layers
            ],
        },
    )
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.digest,
                "size": manifest.size,
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return layers


# -- disk waits --------------------------------------------------------------------------


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def blkio_ticks(root: int) -> dict[tuple[int, int], int]:
    """Clock ticks each thread of ``root``'s process tree has waited for block I/O.

    A thread whose count exceeds its age is left out: this kernel reported, for some
    threads, about the machine's uptime (58,000 s in a 50 s section), a value that
    says nothing of their waits."""
    found: dict[tuple[int, int], int] = {}
    now = float(Path("/proc/uptime").read_text().split()[0]) * _ticks()
    for pid in procs.process_tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = text.rsplit(")", 1)[1].split()
            age = now - int(fields[19])  # field 22, the start, in ticks
            waited = int(fields[39])  # field 42 of stat; 40th after the name
            if waited <= age:
                found[(pid, int(tid))] = waited
    return found


def blkio_seconds_between(
    before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]
) -> float:
    """Seconds waited for block I/O between two ``blkio_ticks``, thread by thread: a
    thread gone by the second is not counted as negative, one left out at either is
    skipped, one new since the first counts from zero."""
    ticks = sum(max(0, waited - before.get(thread, 0)) for thread, waited in after.items())
    return ticks / _ticks()


class _DelayAccounting:
    """kernel.task_delayacct on for the section's run (root only), as it was after."""

    def __init__(self) -> None:
        self.was: str | None = None

    def __enter__(self) -> bool:
        try:
            self.was = DELAYACCT.read_text().strip()
            if self.was != "1":
                DELAYACCT.write_text("1")
            return True
        except OSError:
            self.was = None
            return False

    def __exit__(self, *_: object) -> None:
        if self.was is not None and self.was != "1":
            with contextlib.suppress(OSError):
                DELAYACCT.write_text(self.was)


# -- the clients ----------------------------------------------------------------------------


def _host(server: procs.Server) -> str:
    return server.base_url.split("://", 1)[1]


def _start_upload(server: procs.Server, repo: str) -> str:
    conn = http.client.HTTPConnection(_host(server), timeout=60)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 202:
            raise RuntimeError(f"POST upload on {server.name}: HTTP {reply.status}")
        location = reply.getheader("Location") or ""
    finally:
        conn.close()
    return location if location.startswith("http") else server.base_url + location


def _curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "--fail", *args], check=True, capture_output=True, timeout=600)


def curl_push(server: procs.Server, repo: str, blob: Blob) -> None:
    location = _start_upload(server, repo)
    joiner = "&" if "?" in location else "?"
    _curl(
        "-o", "/dev/null", "-T", str(blob.path),
        "-H", "Content-Type: application/octet-stream",
        f"{location}{joiner}digest={blob.digest}",
    )  # fmt: skip


def curl_pull(server: procs.Server, repo: str, blob: Blob) -> None:
    _curl("-o", "/dev/null", f"{server.base_url}/v2/{repo}/blobs/{blob.digest}")


def _each(work: Callable[[Blob], None], blobs: Sequence[Blob], at_once: int) -> None:
    with ThreadPoolExecutor(at_once) as pool:
        for done in [pool.submit(work, blob) for blob in blobs]:
            done.result()


def crane(binary: str, *args: str) -> None:
    subprocess.run([binary, *args, "--insecure"], check=True, capture_output=True, timeout=600)


def python_job(kind: str, server: procs.Server, repo: str, blobs: Sequence[Blob]) -> dict[str, Any]:
    """A job for bench/client.py (one client process, the blobs 8 at a time)."""
    if kind == "push":
        return {
            "kind": "push_files",
            "base": server.base_url,
            "repo": repo,
            "files": [[str(b.path), b.digest, b.size] for b in blobs],
            "concurrency": min(CONCURRENCY, len(blobs)),
        }
    urls = [[f"{server.base_url}/v2/{repo}/blobs/{b.digest}", b.size] for b in blobs]
    return {"kind": "pull", "urls": urls, "concurrency": min(CONCURRENCY, len(blobs))}


# -- one section run -------------------------------------------------------------------------


@dataclass
class Cell:
    server: str
    client: str
    case: str
    mb_s: list[float]
    cpu_s: list[float]
    blkio_s: list[float]
    # The client's: its processes' (curl, crane, the Python client with its start-up)
    # and this process's own over the action (it makes curl's POSTs).
    client_cpu_s: list[float]
    wall_s: list[float]  # the action's, start-ups included (mb_s may leave them out)

    def best(self) -> float:
        return max(self.mb_s)


def _measure(
    server: procs.Server, action: Callable[[], float | None], size: int
) -> tuple[float, float, float, float, float]:
    """MB/s, the server's CPU seconds, its block I/O wait, the client's CPU seconds and
    the wall time over ``action``, which may return its own duration for the MB/s (the
    python client times itself, without its start-up)."""
    meter = procs.Meter(server.pid)
    blkio = blkio_ticks(server.pid)
    meter.start()
    client = procs.own_cpu_seconds()  # inside the meter's readings: its /proc walks are not in it
    started = time.perf_counter()
    own = action()
    wall = time.perf_counter() - started
    client = procs.own_cpu_seconds() - client
    took = own if own is not None else wall
    used = meter.stop()
    waited = blkio_seconds_between(blkio, blkio_ticks(server.pid))
    return size / took / 1e6, used.cpu_s, waited, client, wall


Action = Callable[[], float | None]


def _actions(
    client: str, server: procs.Server, repo: str, image: Path, blobs: list[Blob], crane_bin: str
) -> tuple[Action, Action]:
    """The push and the pull of ``blobs`` (the layers of the layout ``image``) by ``client``."""
    from bench.cli import run_clients

    at_once = 1 if len(blobs) == 1 else CONCURRENCY
    if client == "curl":

        def push() -> float | None:
            _each(lambda b: curl_push(server, repo, b), blobs, at_once)
            return None

        def pull() -> float | None:
            _each(lambda b: curl_pull(server, repo, b), blobs, at_once)
            return None

    elif client == "crane":
        ref = f"{_host(server)}/{repo}:{image.name}"

        def push() -> float | None:
            crane(crane_bin, "push", str(image), ref)
            return None

        def pull() -> float | None:
            crane(crane_bin, "pull", "--format", "oci", ref, str(image / "pulled"))
            return None

    else:

        def push() -> float | None:
            return _python(run_clients, python_job("push", server, repo, blobs))

        def pull() -> float | None:
            return _python(run_clients, python_job("pull", server, repo, blobs))

    return push, pull


def run(settings: Settings, workdir: Path, distribution_bin: str, crane_bin: str) -> list[Cell]:
    servers = {
        "berth": procs.berth(workdir, 1).start(),
        "distribution": procs.distribution(workdir, distribution_bin).start(),
    }
    cells: dict[tuple[str, str, str], Cell] = {}
    shapes = (
        ("large", 1, settings.large_mib * MiB),
        ("small", settings.small_count, settings.small_mib * MiB),
    )
    try:
        for round_ in range(settings.rounds):
            for client in CLIENTS:
                for name, server in servers.items():
                    for shape, count, size in shapes:
                        image = workdir / f"r{round_}-{client}-{name}-{shape}"
                        # The push then writes into recycled pages, as the disk limit
                        # does (bench/page_cache.py).
                        if server.storage is not None:
                            page_cache.evict_blobs(server.storage)
                        blobs = make_image(image, count, size, image.name)
                        # The new files' dirty pages would be written back during the
                        # measurement, and an fsync on ext4 (data=ordered) waits for them.
                        os.sync()
                        repo = f"clients/{client}-{shape}"
                        push, pull = _actions(client, server, repo, image, blobs, crane_bin)
                        for case, action in ((f"push_{shape}", push), (f"pull_{shape}", pull)):
                            measured = _measure(server, action, count * size)
                            mb_s, cpu, blkio, used, wall = measured
                            key = (name, client, case)
                            cell = cells.setdefault(
                                key, Cell(name, client, case, [], [], [], [], [])
                            )
                            cell.mb_s.append(mb_s)
                            cell.cpu_s.append(cpu)
                            cell.blkio_s.append(blkio)
                            cell.client_cpu_s.append(used)
                            cell.wall_s.append(wall)
                        shutil.rmtree(image, ignore_errors=True)
    finally:
        for server in servers.values():
            server.stop()
    return list(cells.values())


def _python(run_clients: Callable[..., Any], job: dict[str, Any]) -> float:
    results, _ = run_clients([job], None)
    return float(results[0]["end"]) - float(results[0]["start"])


def run_section(args: argparse.Namespace) -> dict[str, Any]:
    from bench import meta
    from tests.support import tools

    settings = QUICK if args.quick else Settings()
    if args.reps is not None:
        settings = replace(settings, rounds=args.reps)
    crane_bin = tools.find_tool("crane")
    if shutil.which("curl") is None or crane_bin is None:
        raise SystemExit("bench: the clients section needs curl and crane (`make tools`)")
    distribution_bin = args.distribution_bin or procs.DISTRIBUTION_BINARY
    print("bench: clients section", file=sys.stderr, flush=True)
    started, load_before = time.monotonic(), meta.load()
    with _DelayAccounting() as accounted, meta.scratch("clients", args.workdir, args.keep) as work:
        cells = run(settings, work, distribution_bin, str(crane_bin))
        machine = meta.machine(work)
    machine["page cache before each push"] = page_cache.NOTE
    result = {
        **meta.envelope("clients", ("registry_server", "bench"), started, load_before, machine),
        "versions": {
            "curl": meta.first_line(["curl", "--version"]),
            "crane": meta.first_line([str(crane_bin), "version"]),
            "distribution": meta.first_line([distribution_bin, "--version"]),
        },
        "settings": asdict(settings),
        "delay_accounting": accounted,
        "note": args.note or "",
        "cells": [asdict(cell) for cell in cells],
        "cores": os.cpu_count() or 1,
    }
    print(markdown(result), file=sys.stderr)
    return result


def _busy_in_best(cell: dict[str, Any]) -> float:
    """Cores the server and the client kept busy in the cell's fastest round."""
    best = max(range(len(cell["mb_s"])), key=lambda i: cell["mb_s"][i])
    return float(cell["cpu_s"][best] + cell["client_cpu_s"][best]) / float(cell["wall_s"][best])


def _page_cache_sentence(result: dict[str, Any]) -> str:
    if result.get("machine", {}).get("page cache before each push") != page_cache.NOTE:
        return ""  # a result saved before the bench did so
    return (
        " Before each push the blobs that server stores leave the page cache, so every"
        " push writes into recycled pages as the disk limit does (bench/page_cache.py)."
    )


def markdown(result: dict[str, Any]) -> str:
    """The docs' table: each case and client, Berth against distribution."""
    s = result["settings"]
    found = {(c["server"], c["client"], c["case"]): c for c in result["cells"]}
    names = {
        "push_large": f"push 1 x {s['large_mib']} MiB",
        "push_small": f"push {s['small_count']} x {s['small_mib']} MiB",
        "pull_large": f"pull 1 x {s['large_mib']} MiB",
        "pull_small": f"pull {s['small_count']} x {s['small_mib']} MiB",
    }
    waits = result.get("delay_accounting")
    lines = [
        f"Best of {s['rounds']} rounds, MB/s; CPU is the server's, the median of the rounds;"
        " disk wait is the time the server's threads spent waiting for block I/O, summed"
        " over its threads (so it can exceed the wall time: eight threads each waiting on"
        " an fsync count eight times), the median of the rounds"
        + ("" if waits else " (not measured: no delay accounting in this run)")
        + ". Client CPU is the client's processes' (the Python client's with its start-up)"
        " and the bench's own (it makes curl's POSTs), the median of the rounds; cores busy"
        " is, in the round the MB/s is from, the server's and the client's CPU over its"
        f" wall time (start-ups in both), out of the machine's {result.get('cores', '?')}"
        " (other work on the machine takes its share too): near that, the row is bound by"
        " their CPU together."
        + _page_cache_sentence(result)
        + f" One run ({result['date']}, commit `{result['commit']}`).",
        "",
        "| case | client | Berth MB/s | distribution MB/s | ratio | Berth CPU s |"
        " distribution CPU s | Berth disk wait, thread-s | distribution disk wait, thread-s |"
        " client CPU s, Berth / distribution | cores busy, Berth / distribution |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        for client in CLIENTS:
            ours, theirs = (
                found.get(("berth", client, case)),
                found.get(("distribution", client, case)),
            )
            if ours is None or theirs is None:
                continue
            a, b = max(ours["mb_s"]), max(theirs["mb_s"])
            median = {
                f"{who}_{what}": statistics.median(cell[what])
                for who, cell in (("ours", ours), ("theirs", theirs))
                for what in ("cpu_s", "blkio_s")
            }
            clients, busy = "", ""
            if ours.get("wall_s") and theirs.get("wall_s"):
                used = [statistics.median(c["client_cpu_s"]) for c in (ours, theirs)]
                clients = f"{used[0]:.2f} / {used[1]:.2f}"
                busy = " / ".join(f"{_busy_in_best(c):.1f}" for c in (ours, theirs))
            lines.append(
                f"| {names[case]} | {client} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |"
                f" {median['ours_cpu_s']:.2f} | {median['theirs_cpu_s']:.2f} |"
                f" {median['ours_blkio_s']:.2f} | {median['theirs_blkio_s']:.2f} |"
                f" {clients} | {busy} |"
            )
    return "\n".join(lines) + "\n"
