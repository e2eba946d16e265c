"""A throwaway PostgreSQL server for tests: Debian's `initdb` and `pg_ctl`, data in a
temporary directory, a free loopback port, fsync off.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres`
account the Debian package creates (or `nobody` without it); its directory is made
with `tempfile` (pytest's own temp tree is private to root) and removed on stop. Each
test gets a database of its own (`CREATE DATABASE ... TEMPLATE template0`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.tools import in_ci

_BIN_ROOT = Path("/usr/lib/postgresql")
_USER = "berth"


def server_bin() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = [d for d in _BIN_ROOT.glob("*/bin") if (d / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def require_server() -> Path:
    """The server's bin directory; skips the test when missing (fails it in CI)."""
    found = server_bin()
    if found is not None:
        return found
    message = (
        f"PostgreSQL server is missing ({_BIN_ROOT}/<version>/bin/initdb, Debian package"
        " postgresql); run `make tools` to install it"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.account: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self.account = pwd.getpwnam(name)
                    break
            if self.account is None:
                raise RuntimeError("no unprivileged account (postgres, nobody) to run postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="berth-postgres-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.password = secrets.token_hex(16)
        self.port = 0
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        account = self.account
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.dir)},
            check=False,
        )
        if done.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log[-3000:]}"
            )

    def start(self) -> PostgresServer:
        if self.account is not None:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        self.dir.chmod(0o700)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            _USER,
            "--pwfile",
            str(pwfile),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C.UTF-8",
            "--no-sync",
        )
        pwfile.unlink()
        self.port = _free_port()
        self._pg_ctl_start()
        self.started = True
        return self

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.dir}",
                # A test cluster: losing it in a crash costs nothing, waiting for disks does.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
            ]
        )
        self._run(
            "pg_ctl",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.log_path),
            "--options",
            options,
            "--wait",
            "--timeout",
            "60",
            "start",
        )

    def halt(self) -> None:
        """Stop the server, keeping its data (an outage); ``resume`` starts it again."""
        self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "fast", "--wait", "stop")

    def resume(self) -> None:
        """Start the halted server again, on the same port with the same data."""
        self._pg_ctl_start()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        import psycopg

        name = dsn.rsplit("/", 1)[1]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and remove its directory."""
        try:
            if self.started:
                try:
                    self._run(
                        "pg_ctl",
                        "--pgdata",
                        str(self.data),
                        "--mode",
                        "fast",
                        "--wait",
                        "stop",
                        timeout=60,
                    )
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._kill()
        finally:
            self.started = False
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self) -> None:
        """SIGKILL the postmaster; its backends notice its death and exit on their own."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
