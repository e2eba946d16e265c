"""Real subprocesses for tests: a small process supervisor and registry servers.

`ManagedProcess` starts a command with its output in a log file, in its own
process group, and stops it with SIGTERM then SIGKILL. `RegistryProcess` runs a
registry server (ours, or CNCF distribution for comparison) on a free loopback
port with its own storage directory and waits until `GET /v2/` answers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import yaml

from .tools import REPO_ROOT, require_tool

RegistryKind = Literal["berth", "distribution"]


class ProcessStartError(RuntimeError):
    """A process exited or never became ready; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ReservedPort:
    """A free loopback port, held until `release()`: for a port that must be known
    (told to peers, written into configs) well before its server starts.

    A socket stays bound to the port (bound, never listening) until `release()`, which
    the caller does just before starting the server that binds it. Meanwhile the kernel
    hands the port to no other bind to port 0 (another `free_port()`, here or in another
    test run on the machine) nor to an outgoing connection; the number from a bare
    `free_port()` is free again at once, and bind(0) does hand it out again. `release()`
    is idempotent; `port` stays valid after it.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def release(self) -> int:
        """Free the port for the server about to bind it; returns the port."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return self.port

    def __repr__(self) -> str:
        state = "released" if self._sock is None else "held"
        return f"ReservedPort({self.port}, {state})"


def tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_orphans(pgid: int) -> None:
    """SIGKILL the processes left in group ``pgid`` whose leader has exited.

    A process whose own id equals ``pgid`` is a new leader that reused the id, not ours.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


class ManagedProcess:
    """One command run in the background, its stdout and stderr in `log_path`.

    The log is appended to across restarts, so it tells the whole story of a test.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait(timeout)
        else:
            # The leader is gone; make sure no child of it lingers. Not killpg: once the
            # leader is reaped its id can be reused by another session's leader.
            _kill_orphans(self._popen.pid)
        return self._popen.returncode

    def kill(self) -> int | None:
        """SIGKILL at once, as a crash would."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:  # not reaped yet, so the group id is still ours
            self._signal_group(signal.SIGKILL)
        else:
            _kill_orphans(self._popen.pid)
        return self._popen.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def startup_error(self, reason: str) -> ProcessStartError:
        return ProcessStartError(
            f"{self.name}: {reason}\n--- {self.log_path} (last lines) ---\n{self.log_tail()}"
        )


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.1,
) -> None:
    """Poll `check` until it is true; fail early when `process` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.running:
            raise process.startup_error(f"exited with {process.returncode} before {what}")
        if check():
            return
        if time.monotonic() > deadline:
            if process is not None:
                raise process.startup_error(f"timed out after {timeout:.0f}s waiting for {what}")
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_status(
    url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None
) -> int | None:
    """The status of a plain GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def distribution_config(root: Path, addr: str) -> dict[str, object]:
    """A CNCF distribution 2.8 config: filesystem storage, deletes on, no auth."""
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": addr,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }


class RegistryProcess:
    """A registry server subprocess on 127.0.0.1 with its own storage root."""

    def __init__(
        self,
        kind: RegistryKind,
        workdir: Path,
        *,
        port: int | None = None,
        config: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.root = workdir / "storage"
        self.config_path = workdir / ("config.yaml" if kind == "berth" else "config.yml")
        self.log_path = workdir / f"{kind}.log"
        self.ready_timeout = ready_timeout
        self.root.mkdir(parents=True, exist_ok=True)

        proc_env = dict(os.environ)
        if kind == "berth":
            self.config_path.write_text(yaml.safe_dump(dict(config or {})))
            argv: list[str | os.PathLike[str]] = [
                sys.executable,
                "-m",
                "registry_server",
                "--config",
                self.config_path,
            ]
            proc_env["BERTH_HTTP_ADDR"] = self.host
            proc_env["BERTH_STORAGE_ROOT"] = str(self.root)
            # Run the working tree's code, whatever directory pytest was started from.
            proc_env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT), str(REPO_ROOT / "operator"), proc_env.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep)
            cwd = REPO_ROOT
        elif kind == "distribution":
            merged = distribution_config(self.root, self.host)
            merged.update(config or {})
            self.config_path.write_text(yaml.safe_dump(merged))
            argv = [require_tool("docker-registry"), "serve", self.config_path]
            cwd = workdir
        else:
            raise ValueError(f"unknown registry kind {kind!r}")
        proc_env.update(env or {})
        self.process = ManagedProcess(kind, argv, self.log_path, env=proc_env, cwd=cwd)

    @property
    def host(self) -> str:
        """host:port, as registry clients want it in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self) -> RegistryProcess:
        self.process.start()
        try:
            wait_until(
                lambda: http_status(f"{self.url}/v2/") in (200, 401),
                timeout=self.ready_timeout,
                what=f"GET {self.url}/v2/",
                process=self.process,
            )
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def kill(self) -> int | None:
        return self.process.kill()

    def restart(self) -> RegistryProcess:
        """Stop (gracefully) if running, then start again on the same port and root."""
        self.process.stop()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)

    def __repr__(self) -> str:
        return f"RegistryProcess({self.kind!r}, url={self.url!r}, root={str(self.root)!r})"
