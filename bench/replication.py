"""Replication latency and throughput between two Berth regions, beside skopeo copy.

`python -m bench.replication [--images 100] [--big-mib 1024]` starts two servers (eu and
us, peers of each other) and a third plain one as the skopeo target, then measures:
- latency: time from a push's manifest PUT returning in eu to the manifest answering in
  us, for N small images pushed one after another; p50 and p99;
- the same N images copied eu -> target by `skopeo copy` (per image wall time);
- throughput of one large image (one layer): push done in eu -> pullable in us, and a
  `skopeo copy` of the same image eu -> target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin

import requests
import yaml

from bench import procs

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _server(workdir: Path, name: str, port: int, peers: dict[str, int]) -> procs.Server:
    root = workdir / name / "storage"
    root.mkdir(parents=True)
    config = workdir / name / "config.yaml"
    replication = (
        {
            "region": name,
            "peers": [{"name": p, "url": f"http://127.0.0.1:{q}"} for p, q in peers.items()],
        }
        if peers
        else {}
    )
    config.write_text(
        yaml.safe_dump(
            {"log": {"level": "warning"}, **({"replication": replication} if peers else {})}
        )
    )
    env = {
        **os.environ,
        "BERTH_HTTP_ADDR": f"127.0.0.1:{port}",
        "BERTH_STORAGE_ROOT": str(root),
        "PYTHONPATH": str(procs.REPO_ROOT),
    }
    argv = [sys.executable, "-m", "registry_server", "--config", str(config)]
    return procs.Server(name, argv, workdir / name, port, env=env, cwd=procs.REPO_ROOT)


def _push_blob(base: str, repo: str, data_path: Path, digest: str) -> None:
    start = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    start.raise_for_status()
    location = urljoin(base, start.headers["Location"])
    sep = "&" if "?" in location else "?"

    with open(data_path, "rb") as body:  # a file object streams with a Content-Length
        done = requests.put(f"{location}{sep}digest={digest}", data=body, timeout=600)
    done.raise_for_status()


def _push_image(base: str, repo: str, tag: str, layer: Path, workdir: Path) -> str:
    layer_digest = "sha256:" + _sha256_file(layer)
    layer_size = layer.stat().st_size
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_path = workdir / "config.json"
    config_path.write_bytes(config)
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    _push_blob(base, repo, layer, layer_digest)
    _push_blob(base, repo, config_path, config_digest)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
    ).encode()
    resp = requests.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": MANIFEST},
        timeout=30,
    )
    resp.raise_for_status()
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _wait_manifest(base: str, repo: str, ref: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    session = requests.Session()
    while time.monotonic() < deadline:
        r = session.head(
            f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST}, timeout=5
        )
        if r.status_code == 200:
            return time.monotonic()
        time.sleep(0.002)
    raise TimeoutError(f"{repo}:{ref} never arrived at {base}")


def _skopeo(src: str, dst: str) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{src}",
            f"docker://{dst}",
        ],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run(images: int, big_mib: int, workdir: Path) -> dict[str, float]:
    ports = {n: procs.free_port() for n in ("eu", "us", "target")}
    eu = _server(workdir, "eu", ports["eu"], {"us": ports["us"]}).start()
    us = _server(workdir, "us", ports["us"], {"eu": ports["eu"]}).start()
    target = _server(workdir, "target", ports["target"], {}).start()
    results: dict[str, float] = {}
    try:
        latencies, copies = [], []
        for i in range(images):
            layer = workdir / "small.bin"
            layer.write_bytes(os.urandom(4096))
            _push_image(eu.base_url, "bench/small", f"v{i}", layer, workdir)
            done = time.monotonic()
            latencies.append(_wait_manifest(us.base_url, "bench/small", f"v{i}") - done)
            copies.append(
                _skopeo(
                    f"127.0.0.1:{ports['eu']}/bench/small:v{i}",
                    f"127.0.0.1:{ports['target']}/bench/small:v{i}",
                )
            )
        results.update(
            {
                "replication_latency_p50_ms": _pct(latencies, 50) * 1000,
                "replication_latency_p99_ms": _pct(latencies, 99) * 1000,
                "skopeo_copy_p50_ms": _pct(copies, 50) * 1000,
                "skopeo_copy_p99_ms": _pct(copies, 99) * 1000,
            }
        )
        big = workdir / "big.bin"
        with open(big, "wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(1 << 20))
        _push_image(eu.base_url, "bench/big", "v1", big, workdir)
        done = time.monotonic()
        arrived = _wait_manifest(us.base_url, "bench/big", "v1")
        results["replication_big_mb_s"] = big_mib / (arrived - done)
        seconds = _skopeo(
            f"127.0.0.1:{ports['eu']}/bench/big:v1", f"127.0.0.1:{ports['target']}/bench/big:v1"
        )
        results["skopeo_big_mb_s"] = big_mib / seconds
    finally:
        for server in (eu, us, target):
            server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--big-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    if shutil.which("skopeo") is None:
        print("skopeo is missing: run `make tools`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="berth-bench-rep-") as tmp:
        results = run(args.images, args.big_mib, Path(tmp))
    print(json.dumps({k: round(v, 1) for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
