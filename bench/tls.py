"""Pull throughput over TLS against plain HTTP: ``python -m bench.tls``.

Two Berth servers on this machine, one plain and one with ``http.tls`` (an ECDSA P-256
certificate from a CA made here), each holding the same blob (256 MiB by default). curl
pulls it, one stream and then several at once, each pull a new connection (handshake
included). Printed per case: the median throughput and the server's CPU seconds per GiB
sent (its user+system time over the pulls), which says more than MB/s on a shared machine.
The "+relay" cases pull the same server through the node proxy: plain HTTP from curl to
the relay, which splices to a plain server and originates TLS to a TLS one.

Plain HTTP writes blobs onto the socket from a thread (registry_server/http/file_bodies.py:
no pass through the event loop); TLS cannot, the bytes go through the event loop's
encryption, so the CPU per GiB is where the price shows.

`python -m bench --only tls` runs it as a section of `make bench`: it saves
bench/results/tls.json, and its table goes into docs/benchmarks.md ("TLS") through
bench/docs.py.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import ipaddress
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO = "bench/tls"
CASES = ("plain", "tls", "plain+relay", "tls+relay")


@dataclass(frozen=True)
class Settings:
    size_mib: int = 256
    rounds: int = 5
    streams: int = 4  # parallel pulls of the second case


QUICK = Settings(size_mib=8, rounds=1, streams=2)


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, serving certificate, key) for 127.0.0.1, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        _write_pem(directory / "ca.crt", ca.public_bytes(pem)),
        _write_pem(directory / "tls.crt", leaf.public_bytes(pem)),
        _write_pem(
            directory / "tls.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    ca: Path | None
    relay: subprocess.Popen[bytes] | None = None  # a node proxy in front, pulled through
    relay_port: int = 0

    def context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else None

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.process.pid)

    def relay_cpu_seconds(self) -> float:
        return _cpu_seconds(self.relay.pid) if self.relay is not None else 0.0

    def pull_url(self) -> tuple[str, Path | None]:
        """Where curl pulls from, and the CA it needs (none through a relay)."""
        if self.relay is None:
            return self.url, self.ca
        return f"http://127.0.0.1:{self.relay_port}", None


def with_relay(server: Server, workdir: Path) -> Server:
    """The same server pulled through a node proxy (TLS to it when the server has TLS)."""
    port = _free_port()
    argv = [sys.executable, "-m", "registry_server.node_proxy", "--listen",
            f"127.0.0.1:{port}", "--upstream", server.url.split("://", 1)[1]]  # fmt: skip
    if server.ca:
        argv += ["--upstream-ca", str(server.ca)]
    log = (workdir / f"relay-{port}.log").open("wb")
    relay = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/"):
                break
        except OSError:
            time.sleep(0.1)
    return Server(server.process, server.url, server.ca, relay, port)


def start(workdir: Path, tls: tuple[Path, Path] | None, ca: Path | None) -> Server:
    port = _free_port()
    config: dict[str, object] = {
        "http": {"addr": f"127.0.0.1:{port}"},
        "storage": {"root": str(workdir / "storage")},
        "gc": {"interval_seconds": 0},
        "log": {"level": "warning"},
    }
    if tls is not None:
        config["http"] = {
            "addr": f"127.0.0.1:{port}",
            "tls": {"certificate": str(tls[0]), "key": str(tls[1])},
        }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "registry_server", "--config", str(workdir / "config.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO_ROOT,
    )
    server = Server(process, f"{'https' if tls else 'http'}://127.0.0.1:{port}", ca)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{server.url}/v2/", context=server.context()):
                return server
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start: {(workdir / 'server.log').read_text()[-2000:]}")


def _blob(size: int) -> Iterator[bytes]:
    block = hashlib.sha256(b"berth-bench-tls").digest() * (1 << 15)  # 1 MiB
    left = size
    while left > 0:
        yield block[: min(left, len(block))]
        left -= len(block)


def push(server: Server, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in _blob(size):
        digest.update(chunk)
    ref = "sha256:" + digest.hexdigest()
    host = server.url.split("://", 1)[1]
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, context=server.context())
        if server.ca
        else http.client.HTTPConnection(host)
    )
    conn.request(
        "POST",
        f"/v2/{REPO}/blobs/uploads/?digest={ref}",
        body=_blob(size),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    reply = conn.getresponse()
    reply.read()
    conn.close()
    if reply.status != 201:
        raise RuntimeError(f"push to {server.url}: HTTP {reply.status}")
    return ref


def _curl(server: Server, digest: str) -> float:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}"]
    url, ca = server.pull_url()
    if ca:
        argv += ["--cacert", str(ca)]
    out = subprocess.run(
        [*argv, f"{url}/v2/{REPO}/blobs/{digest}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout) / (1 << 20)


@dataclass
class Figures:
    streams: int
    mib_s: float  # median per stream
    total_mib_s: float  # all streams together
    cpu_s_per_gib: float
    relay_cpu_s_per_gib: float


def measure(server: Server, digest: str, size: int, streams: int, rounds: int) -> Figures:
    speeds: list[float] = []
    totals: list[float] = []
    cpu_before, relay_before = server.cpu_seconds(), server.relay_cpu_seconds()
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(rounds):
            started = time.monotonic()
            got = list(pool.map(lambda _: _curl(server, digest), range(streams)))
            totals.append(streams * size / (1 << 20) / (time.monotonic() - started))
            speeds += got
    cpu = server.cpu_seconds() - cpu_before
    relay_cpu = server.relay_cpu_seconds() - relay_before
    gib = rounds * streams * size / (1 << 30)
    return Figures(
        streams, statistics.median(speeds), statistics.median(totals), cpu / gib, relay_cpu / gib
    )


def measure_all(s: Settings, root: Path) -> list[dict[str, Any]]:
    """Every case at 1 and `s.streams` streams: one row each."""
    size = s.size_mib << 20
    (root / "certs").mkdir()
    ca, cert, key = make_certificates(root / "certs")
    servers: dict[str, Server] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name, tls in (("plain", None), ("tls", (cert, key))):
            (root / name).mkdir()
            servers[name] = start(root / name, tls, ca if tls else None)
        digests = {name: push(server, size) for name, server in servers.items()}
        # A node proxy in front of each: splice to plain HTTP, TLS origination to TLS.
        for name in ("plain", "tls"):
            servers[f"{name}+relay"] = with_relay(servers[name], root)
            digests[f"{name}+relay"] = digests[name]
        for streams in (1, s.streams):
            for name in CASES:
                server = servers[name]
                figures = measure(server, digests[name], size, streams, s.rounds)
                row = {"case": name, **asdict(figures)}
                if server.relay is None:
                    row["relay_cpu_s_per_gib"] = None
                rows.append(row)
    finally:
        for server in servers.values():
            for process in (server.relay, server.process):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(10)
    return rows


def run_section(args: argparse.Namespace) -> dict[str, Any]:
    from bench import meta

    settings = QUICK if args.quick else Settings()
    if args.reps is not None:
        settings = replace(settings, rounds=args.reps)
    if shutil.which("curl") is None:
        raise SystemExit("bench: curl is missing (Debian package curl)")
    print("bench: tls section", file=sys.stderr, flush=True)
    started, load_before = time.monotonic(), meta.load()
    with meta.scratch("tls", args.workdir, args.keep) as workdir:
        rows = measure_all(settings, workdir)
        machine = meta.machine(workdir)
    result = {
        **meta.envelope("tls", ("registry_server", "bench"), started, load_before, machine),
        "versions": {"curl": meta.first_line(["curl", "--version"])},
        "settings": asdict(settings),
        "note": args.note or "",
        "rows": rows,
    }
    print(markdown(result), file=sys.stderr)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The docs' table: each case against plain HTTP at the same number of streams."""
    s = result["settings"]
    plain = {row["streams"]: row["total_mib_s"] for row in result["rows"] if row["case"] == "plain"}
    lines = [
        f"Pull of a {s['size_mib']} MiB blob with curl, a new connection (and handshake) per"
        f" pull, median of {s['rounds']} rounds; one run ({result['date']}, commit"
        f" `{result['commit']}`). CPU is per GiB sent: the server's, and the node proxy's in"
        " the +relay cases (curl speaks plain HTTP to it; it splices to a plain server and"
        " originates TLS to a TLS one).",
        "",
        "| case | streams | MiB/s per stream | MiB/s total | vs plain | server CPU s/GiB |"
        " relay CPU s/GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ratio = row["total_mib_s"] / plain[row["streams"]] if plain.get(row["streams"]) else 0
        relay = row["relay_cpu_s_per_gib"]
        lines.append(
            f"| {row['case']} | {row['streams']} | {row['mib_s']:.0f} | {row['total_mib_s']:.0f}"
            f" | {ratio:.2f}x | {row['cpu_s_per_gib']:.2f} |"
            f" {'-' if relay is None else f'{relay:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=Settings.size_mib)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument(
        "--streams", type=int, default=Settings.streams, help="parallel pulls, second case"
    )
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("bench.tls: curl is needed", file=sys.stderr)
        return 2
    settings = Settings(args.size_mib, args.rounds, args.streams)
    with tempfile.TemporaryDirectory(prefix="berth-bench-tls-") as tmp:
        rows = measure_all(settings, Path(tmp))
    result = {"settings": asdict(settings), "date": "now", "commit": "working tree", "rows": rows}
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
