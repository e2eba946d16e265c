"""Replication between two Berth regions beside `skopeo copy`, both timed from push done.

Four servers, one worker each, on loopback: eu and us (peers of each other), and two
plain ones, src and target, for skopeo. Every image is pushed twice, once to eu and
once to src, each time with a fresh layer; each clock starts when that push's manifest
PUT has returned (push done) and stops when the destination first answers a HEAD of
the manifest with 200 (pullable):

- Berth: push done in eu -> pullable in us; the replicator is already running.
- skopeo: push done in src -> `skopeo copy src target` started -> pullable in target.
  This includes skopeo's process start-up, which is also measured on its own in the
  same run (a `skopeo copy` from a closed loopback port: start until it fails on its
  first connection) and reported beside it, and subtracted in the "excluding start-up"
  rows (total minus the median start-up).

The destination is polled at the same interval in both cases, from push done on, so
both servers see the same extra load. Small images go one after another, the order of
the two alternating; then one large image (one layer) the same way, as throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
import yaml

from bench import procs

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SKOPEO_TLS = ["--src-tls-verify=false", "--dest-tls-verify=false"]


@dataclass(frozen=True)
class Settings:
    images: int = 100
    small_bytes: int = 4096
    big_mib: int = 1024
    # How often the destination is asked whether the image is there yet.
    poll_small_s: float = 0.002
    poll_big_s: float = 0.02
    timeout_s: float = 600.0


QUICK = Settings(images=3, big_mib=4)


class ReplicationError(RuntimeError):
    pass


def _server(workdir: Path, name: str, port: int, peers: dict[str, int]) -> procs.Server:
    root = workdir / name / "storage"
    root.mkdir(parents=True)
    config = workdir / name / "config.yaml"
    settings: dict[str, Any] = {"log": {"level": "warning"}}
    if peers:
        settings["replication"] = {
            "region": name,
            "peers": [{"name": p, "url": f"http://127.0.0.1:{q}"} for p, q in peers.items()],
        }
    config.write_text(yaml.safe_dump(settings))
    env = {
        **os.environ,
        "BERTH_HTTP_ADDR": f"127.0.0.1:{port}",
        "BERTH_STORAGE_ROOT": str(root),
        "BERTH_WORKERS": "1",
        "PYTHONPATH": str(procs.REPO_ROOT),
    }
    argv = [sys.executable, "-m", "registry_server", "--config", str(config)]
    return procs.Server(name, argv, workdir / name, port, env=env, cwd=procs.REPO_ROOT)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _push_blob(session: requests.Session, base: str, repo: str, path: Path, digest: str) -> None:
    start = session.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    start.raise_for_status()
    location = urljoin(base, start.headers["Location"])
    sep = "&" if "?" in location else "?"
    with open(path, "rb") as body:  # a file object streams with a Content-Length
        done = session.put(f"{location}{sep}digest={digest}", data=body, timeout=600)
    done.raise_for_status()


@dataclass(frozen=True)
class Image:
    """One image's files, hashed before any clock starts."""

    layer: Path
    layer_digest: str
    config: bytes
    manifest: bytes


def make_image(workdir: Path, name: str, size: int) -> Image:
    layer = workdir / f"{name}.layer"
    with open(layer, "wb") as f:
        for pos in range(0, size, 1 << 20):
            f.write(os.urandom(min(1 << 20, size - pos)))
    digest = _sha256_file(layer)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": size,
                }
            ],
        }
    ).encode()
    return Image(layer, digest, config, manifest)


def push(session: requests.Session, base: str, repo: str, tag: str, image: Image) -> float:
    """Push the image; returns the moment its manifest PUT returned (push done)."""
    _push_blob(session, base, repo, image.layer, image.layer_digest)
    config = image.layer.with_suffix(".config")
    config.write_bytes(image.config)
    _push_blob(session, base, repo, config, "sha256:" + hashlib.sha256(image.config).hexdigest())
    resp = session.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        data=image.manifest,
        headers={"Content-Type": MANIFEST},
        timeout=30,
    )
    resp.raise_for_status()
    return time.monotonic()


def wait_pullable(
    session: requests.Session, base: str, repo: str, tag: str, interval: float, timeout: float
) -> float:
    """The moment ``base`` first answers a HEAD of the manifest with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = session.head(
            f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST}, timeout=5
        )
        if r.status_code == 200:
            return time.monotonic()
        time.sleep(interval)
    raise ReplicationError(f"{repo}:{tag} never became pullable at {base}")


def skopeo_copy(src: str, dst: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["skopeo", "copy", *SKOPEO_TLS, f"docker://{src}", f"docker://{dst}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def skopeo_startup(closed_port: int) -> float:
    """Start of `skopeo copy` to its failure on the first connection (nothing listens)."""
    started = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "copy",
            *SKOPEO_TLS,
            f"docker://127.0.0.1:{closed_port}/bench/none:v1",
            f"docker://127.0.0.1:{closed_port}/bench/none:v2",
        ],
        capture_output=True,
        check=False,
    )
    return time.monotonic() - started


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


class Run:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.workdir = workdir
        ports = {n: procs.free_port() for n in ("eu", "us", "src", "target")}
        self.ports = ports
        self.servers = {
            "eu": _server(workdir, "eu", ports["eu"], {"us": ports["us"]}),
            "us": _server(workdir, "us", ports["us"], {"eu": ports["eu"]}),
            "src": _server(workdir, "src", ports["src"], {}),
            "target": _server(workdir, "target", ports["target"], {}),
        }
        self.session = requests.Session()
        self.poll_session = requests.Session()

    def url(self, name: str) -> str:
        return self.servers[name].base_url

    def host(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def replicate(self, repo: str, tag: str, image: Image, interval: float) -> float:
        done = push(self.session, self.url("eu"), repo, tag, image)
        arrived = wait_pullable(
            self.poll_session, self.url("us"), repo, tag, interval, self.s.timeout_s
        )
        return arrived - done

    def skopeo(self, repo: str, tag: str, image: Image, interval: float) -> float:
        done = push(self.session, self.url("src"), repo, tag, image)
        copy = skopeo_copy(
            f"{self.host('src')}/{repo}:{tag}", f"{self.host('target')}/{repo}:{tag}"
        )
        try:
            arrived = wait_pullable(
                self.poll_session, self.url("target"), repo, tag, interval, self.s.timeout_s
            )
        finally:
            _, err = copy.communicate(timeout=self.s.timeout_s)
        if copy.returncode != 0:
            raise ReplicationError(f"skopeo copy failed: {err.decode(errors='replace')[-2000:]}")
        return arrived - done

    def measure(self) -> dict[str, Any]:
        closed = procs.free_port()  # nothing listens there: skopeo fails on connecting
        replicated: list[float] = []
        copied: list[float] = []
        startup: list[float] = []
        for i in range(self.s.images):
            tag = f"v{i}"
            ours = make_image(self.workdir, "ours", self.s.small_bytes)
            theirs = make_image(self.workdir, "theirs", self.s.small_bytes)
            steps: list[Callable[[], None]] = [
                lambda: replicated.append(
                    self.replicate("bench/small", tag, ours, self.s.poll_small_s)  # noqa: B023
                ),
                lambda: copied.append(
                    self.skopeo("bench/small", tag, theirs, self.s.poll_small_s)  # noqa: B023
                ),
            ]
            # Alternate the order, so neither always runs right after the other.
            for step in steps if i % 2 == 0 else steps[::-1]:
                step()
            startup.append(skopeo_startup(closed))
        started = time.monotonic()
        ours = make_image(self.workdir, "ours-big", self.s.big_mib << 20)
        theirs = make_image(self.workdir, "theirs-big", self.s.big_mib << 20)
        print(
            f"  made two {self.s.big_mib} MiB layers: {time.monotonic() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        big_replicated = self.replicate("bench/big", "v1", ours, self.s.poll_big_s)
        big_copied = self.skopeo("bench/big", "v1", theirs, self.s.poll_big_s)
        big_startup = [skopeo_startup(closed) for _ in range(5)]
        size_mb = (self.s.big_mib << 20) / 1e6
        startup_median = statistics.median(startup)
        return {
            "small": {
                "images": self.s.images,
                "layer_bytes": self.s.small_bytes,
                "replication_ms": [round(s * 1000, 2) for s in replicated],
                "skopeo_ms": [round(s * 1000, 2) for s in copied],
                "skopeo_startup_ms": [round(s * 1000, 2) for s in startup],
                "replication_p50_ms": round(_pct(replicated, 50) * 1000, 1),
                "replication_p99_ms": round(_pct(replicated, 99) * 1000, 1),
                "skopeo_p50_ms": round(_pct(copied, 50) * 1000, 1),
                "skopeo_p99_ms": round(_pct(copied, 99) * 1000, 1),
                "skopeo_startup_p50_ms": round(_pct(startup, 50) * 1000, 1),
                "skopeo_startup_p99_ms": round(_pct(startup, 99) * 1000, 1),
                "skopeo_excl_startup_p50_ms": round((_pct(copied, 50) - startup_median) * 1000, 1),
                "skopeo_excl_startup_p99_ms": round((_pct(copied, 99) - startup_median) * 1000, 1),
            },
            "big": {
                "mib": self.s.big_mib,
                "replication_s": round(big_replicated, 2),
                "skopeo_s": round(big_copied, 2),
                "skopeo_startup_ms": [round(s * 1000, 2) for s in big_startup],
                "replication_mb_s": round(size_mb / big_replicated, 1),
                "skopeo_mb_s": round(size_mb / big_copied, 1),
                "skopeo_excl_startup_mb_s": round(
                    size_mb / (big_copied - statistics.median(big_startup)), 1
                ),
            },
        }


def skopeo_version() -> str:
    try:
        out = subprocess.run(["skopeo", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def run(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure everything; returns the section's result (without the run's metadata)."""
    if shutil.which("skopeo") is None:
        raise ReplicationError("skopeo is missing: run `make tools`")
    bench = Run(settings, workdir)
    started: list[procs.Server] = []
    try:
        for server in bench.servers.values():
            started.append(server.start())
        return {"settings": asdict(settings), "skopeo": skopeo_version(), **bench.measure()}
    except BaseException:
        for server in started:
            print(f"--- {server.name} ({server.state()}) ---\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        for server in started:
            server.stop()
        bench.session.close()
        bench.poll_session.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.replication` is `python -m bench --only replication`."""
    from bench import cli

    return cli.main(["--only", "replication", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
