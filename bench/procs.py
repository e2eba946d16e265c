"""Server processes for the benchmark and their resource use, read from /proc.

Every server runs in its own session (process group) with its output in a log file.
CPU time is utime+stime of every live process in the server's tree (workers included)
plus what the root has reaped from dead children. Peak memory is VmHWM summed over the
tree; writing "5" to /proc/<pid>/clear_refs resets VmHWM, so each phase gets its own peak.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def own_cpu_seconds(children_only: bool = False) -> float:
    """CPU time (user + system) of this process's ended children (the clients it ran and
    waited for), and of this process itself unless ``children_only``."""
    who = [resource.RUSAGE_CHILDREN] + ([] if children_only else [resource.RUSAGE_SELF])
    return sum(used.ru_utime + used.ru_stime for used in map(resource.getrusage, who))


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of the tree under ``root``, reaped children included."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        total += int(fields[11]) + int(fields[12])
        if pid == root:
            total += int(fields[13]) + int(fields[14])
    return total / _TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def peak_rss_mib(root: int) -> float:
    """VmHWM summed over the tree (shared pages of forked workers count once per worker)."""
    return sum(_status_kib(pid, "VmHWM") for pid in process_tree(root)) / 1024


def rss_mib(root: int) -> float:
    return sum(_status_kib(pid, "VmRSS") for pid in process_tree(root)) / 1024


def process_rss_mib(pid: int) -> float:
    """VmRSS of one process (no walk of /proc: cheap enough to sample every 50 ms)."""
    return _status_kib(pid, "VmRSS") / 1024


def reset_peak_rss(root: int) -> bool:
    """Reset VmHWM to the current RSS for the whole tree; False when the kernel refuses."""
    ok = True
    for pid in process_tree(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    peak_rss_mib: float
    # CPU of a service the setup depends on and shares with others (an object store).
    store_cpu_s: float | None = None


class Meter:
    """CPU and peak memory of one process tree over a phase."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._cpu = 0.0
        self.hwm_reset = True

    def start(self) -> None:
        self.hwm_reset = reset_peak_rss(self.root)
        self._cpu = cpu_seconds(self.root)

    def stop(self) -> Usage:
        return Usage(cpu_seconds(self.root) - self._cpu, peak_rss_mib(self.root))


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


class Server:
    """One server subprocess on 127.0.0.1:<port>, in its own process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        workdir: Path,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_path: str = "/v2/",
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.workdir = workdir
        self.port = port
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_path = ready_path
        self.log_path = workdir / f"{name}.log"
        self.storage: Path | None = None  # where it stores blobs, when on local files
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} is not running"
        return self._popen.pid

    def state(self) -> str:
        if self._popen is None:
            return "not started"
        code = self._popen.poll()
        return f"port {self.port}, " + ("running" if code is None else f"exited with {code}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0) -> Server:
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while _http_status(self.base_url + self.ready_path) not in (200, 401):
            if self._popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._popen is None:
            return
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait(timeout)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)


LOG_LEVEL_BERTH = "warning"
LOG_LEVEL_DISTRIBUTION = "warn"


def berth(
    workdir: Path,
    workers: int,
    extra_env: Mapping[str, str] | None = None,
    src: Path = REPO_ROOT,
) -> Server:
    """Our server: `python -m registry_server` from ``src``, no auth, logs at warning level."""
    name = f"berth-w{workers}"
    root = workdir / name / "storage"
    root.mkdir(parents=True)
    port = free_port()
    config = workdir / name / "config.yaml"
    config.write_text(yaml.safe_dump({"log": {"level": LOG_LEVEL_BERTH, "format": "json"}}))
    env = dict(os.environ)
    env.update(
        {
            "BERTH_HTTP_ADDR": f"127.0.0.1:{port}",
            "BERTH_STORAGE_ROOT": str(root),
            "BERTH_WORKERS": str(workers),
            "BERTH_LOG_LEVEL": LOG_LEVEL_BERTH,
            "PYTHONPATH": os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p),
        }
    )
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "registry_server", "--config", str(config)]
    server = Server(name, argv, workdir / name, port, env=env, cwd=src)
    server.storage = root
    return server


def find_binary(name: str) -> str | None:
    """A program on PATH or in the sbin directories Debian puts daemons in."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


DISTRIBUTION_BINARY = "/usr/bin/docker-registry"


def distribution_config(root: Path, port: int) -> dict[str, object]:
    """Distribution's stock (Debian / registry:2) settings minus auth; quiet logs."""
    return {
        "version": 0.1,
        "log": {"level": LOG_LEVEL_DISTRIBUTION, "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            # As in the Debian package's and the registry:2 image's default config.
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # Lets `GET /v2/_catalog?n=10000` list everything in one page, as Berth does.
        "catalog": {"maxentries": 10_000},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }


def distribution(workdir: Path, binary: str = DISTRIBUTION_BINARY) -> Server:
    root = workdir / "distribution" / "storage"
    root.mkdir(parents=True)
    port = free_port()
    config = workdir / "distribution" / "config.yml"
    config.write_text(yaml.safe_dump(distribution_config(root, port)))
    server = Server("distribution", [binary, "serve", str(config)], workdir / "distribution", port)
    server.storage = root
    return server


NGINX_BINARY = "/usr/sbin/nginx"


def nginx(workdir: Path, docroot: Path, binary: str = NGINX_BINARY) -> Server:
    """nginx serving ``docroot`` with sendfile, in the foreground, on a free loopback port."""
    home = workdir / "nginx"
    home.mkdir(parents=True)
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {home}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    (home / "nginx.conf").write_text(
        f"""daemon off;
{user}worker_processes auto;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
{temp}
  server {{
    listen 127.0.0.1:{port};
    root {docroot};
    location / {{ }}
  }}
}}
"""
    )
    argv = [binary, "-p", str(home), "-c", str(home / "nginx.conf"), "-e", str(home / "error.log")]
    (docroot / "ready.txt").write_text("ok\n")
    return Server("nginx", argv, home, port, ready_path="/ready.txt")
