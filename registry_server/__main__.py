"""``python -m registry_server``: load the config and serve, with N worker processes."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from registry_server import config as config_mod


class _JsonFormatter(logging.Formatter):
    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _setup_logging(cfg: config_mod.LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=cfg.level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _serve(
    cfg: config_mod.Config,
    sock: socket.socket,
    metrics_sock: socket.socket | None = None,
    worker_id: int = 0,
) -> None:
    # A SIGTERM during start-up (a rolling update, the supervisor stopping its workers)
    # must not kill the process mid-way with the default action: noted, acted on (a
    # drain, then a graceful stop) once serving.
    early: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: early.append(received))
    from registry_server.app import build_app, build_metrics_app
    from registry_server.http import serving, tls

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    metrics = build_metrics_app(cfg)
    extra = [(metrics, metrics_sock)] if metrics is not None and metrics_sock is not None else []
    # Each worker has its own context (and watch): SSL state does not survive a fork.
    serving_tls = tls.ServingTls(cfg.http.tls) if cfg.http.tls is not None else None
    serving.run(
        build_app(cfg, worker_id),
        sock,
        shutdown_timeout=10,
        extra=extra,
        tls=serving_tls,
        drain_seconds=cfg.http.drain_seconds,
        early_signals=early,
    )


_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _die_with(parent: int) -> None:
    """Make this worker stop (SIGTERM: a graceful shutdown) when the supervisor `parent`
    dies, even of SIGKILL: orphaned workers would keep the port and the index, so a
    restarted server could not bind, or old code would go on serving."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: watch the parent instead

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(
    cfg: config_mod.Config, sock: socket.socket, metrics_sock: socket.socket | None
) -> int:
    """Fork workers that share the listening socket; restart none, stop all together."""
    log = logging.getLogger("registry_server")
    children: list[int] = []
    supervisor = os.getpid()
    for worker_id in range(cfg.http.workers):
        pid = os.fork()
        if pid == 0:
            code = 1  # a worker that dies of an exception stops them all (then a restart)
            _die_with(supervisor)
            try:
                _serve(cfg, sock, metrics_sock, worker_id)
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code in (None, 0) else 1
            except BaseException:
                log.exception("worker failed", extra={"worker": worker_id})
            finally:
                os._exit(code)
        children.append(pid)
    log.info("workers started", extra={"workers": children})

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        pid, code = os.wait()
        if pid in children:
            children.remove(pid)
            if code != 0:
                status = 1
                forward(signal.SIGTERM, None)
    return status


_COMMANDS = ("check", "rebuild", "backup")


def _command(args: list[str]) -> str | None:
    """The first argument that is not an option or an option's value."""
    rest = iter(args)
    for arg in rest:
        if arg == "--config":
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if _command(args_in) in _COMMANDS:
        from registry_server import maintenance  # the index's recovery tools

        return maintenance.main(args_in)
    parser = argparse.ArgumentParser(
        prog="berth-registry",
        description=__doc__,
        epilog="commands (the SQLite index's recovery; see docs/operations.md): "
        "berth-registry check [--repair] | rebuild | backup DEST [--config FILE]",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"berth-registry: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log)
    if cfg.http.tls is not None:
        from registry_server.http import tls

        try:  # a pair that cannot serve stops the start-up here, with the reason
            tls.read_pair(cfg.http.tls)
        except tls.CertificateError as exc:
            print(f"berth-registry: invalid configuration: http.tls: {exc}", file=sys.stderr)
            return 2
    sock = _bind(cfg.http.host, cfg.http.port)
    # Every worker shares it, like the registry's socket; each answers with its own counters.
    metrics_sock = (
        _bind(cfg.http.metrics_host, cfg.http.metrics_port) if cfg.http.metrics_addr else None
    )
    logging.getLogger("registry_server").info(
        "listening",
        extra={
            "addr": cfg.http.addr,
            "scheme": cfg.http.scheme,
            "metrics_addr": cfg.http.metrics_addr or cfg.http.addr,
            "root": str(cfg.storage.root),
            "workers": cfg.http.workers,
        },
    )
    if cfg.metadata.driver == "sqlite":  # it keeps a tag record (storage/records.py)
        from registry_server import maintenance

        # Before any process serves (nothing appends meanwhile).
        written = maintenance.backfill_records(cfg.storage.root)
        if written:
            logging.getLogger("registry_server").info(
                "tag records written from the index", extra={"repositories": written}
            )
    if cfg.http.workers == 1:
        _serve(cfg, sock, metrics_sock)
        return 0
    return _supervise(cfg, sock, metrics_sock)


if __name__ == "__main__":
    sys.exit(main())
