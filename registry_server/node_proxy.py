"""``python -m registry_server.node_proxy``: the node-local relay in front of a Registry.

A container runtime resolves image names with the node's DNS (no ``*.svc``) and speaks
plain HTTP only to ``localhost``. The operator therefore runs this relay on every node
(a DaemonSet whose hostPort is bound to 127.0.0.1) so that kubelets pull
``localhost:<port>/team-a/api:v1``; every connection is passed byte for byte to the
Registry's Service. There is no HTTP in here: the relay is TCP, both ways, with
half-closes passed on, so whatever the registry speaks reaches the client unchanged.

How it is built (see docs/architecture.md, "Node proxy", for the measurements):

- one thread per direction of each connection, moving bytes with ``os.splice`` through
  a pipe (the bytes never enter the process; ``recv_into``/``sendall`` where splice is
  missing), so a pull is as fast as the kernel moves it and costs almost no CPU;
- the upstream is connected only once the client has sent its first byte: a kubelet's
  tcpSocket probe or a port scan never opens a connection to the registry;
- the upstream name is resolved for every connection, so a changed Service is followed;
- at most ``--max-connections`` at once: beyond that, new connections wait in the
  listen backlog instead of being refused;
- SIGTERM (or SIGINT) stops accepting, lets open connections finish for
  ``--drain-seconds``, then cuts the rest and exits 0.

Only the standard library is used, so the relay starts in a fraction of a second and
stays at the interpreter's own memory (an import-linter contract keeps it so).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("registry_server.node_proxy")

CHUNK = 1 << 20  # bytes moved per splice, and the pipe size where the kernel allows it
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_FIRST_BYTE_TIMEOUT = 60.0  # a client that connects and stays silent is dropped
DEFAULT_DRAIN_SECONDS = 10.0
_SPLICE = hasattr(os, "splice")
# Errors that end one connection, not the relay.
_PEER_ERRORS = (ConnectionError, TimeoutError, BrokenPipeError, OSError)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Throttled:
    """Log the same failure at most once per interval, with how often it happened."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._count[message] = self._count.get(message, 0) + 1
            if now - self._last.get(message, -self.interval) < self.interval:
                return
            count = self._count.pop(message)
            self._last[message] = now
        log.warning("%s%s", message, f" ({count} times)" if count > 1 else "")


class Relay:
    """Accept on `listen`, pass every connection to `upstream` (resolved each time)."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT,
        splice: bool = _SPLICE,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.upstream = upstream
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.splice = splice
        self._throttled = _Throttled()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every socket of every open connection
        self._active = 0
        self._cut = False  # set when the drain is over: what is still open gets cut
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._listener = socket.create_server(
            listen,
            family=socket.AF_INET6 if ":" in listen[0] else socket.AF_INET,
            backlog=1024,
            reuse_port=False,
        )
        self._listener.setblocking(False)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    # -- the accept loop ------------------------------------------------------------

    def serve(self, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Run until stop() (or a signal handler calling it); then drain and return."""
        log.info("relaying %s:%d to %s:%d", *self.address, *self.upstream)
        listener = self._listener.fileno()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watching = False
        try:
            while not self._stopping.is_set():
                # At the limit the listener is not watched: clients wait in the backlog.
                want = self.active < self.max_connections
                if want != watching:
                    if want:
                        poller.register(listener, select.POLLIN)
                    else:
                        poller.unregister(listener)
                    watching = want
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if listener in ready and not self._stopping.is_set():
                    self._accept()
        finally:
            self._listener.close()
            self._drain(drain_seconds)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def stop(self) -> None:
        """Stop accepting; serve() drains open connections and returns. Signal-safe."""
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _accept(self) -> None:
        while self.active < self.max_connections:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off briefly, keep serving
                self._throttled.warning(f"accept failed: {exc}")
                time.sleep(0.1)
                return
            with self._lock:
                self._active += 1
                self._open.add(client)
            threading.Thread(
                target=self._connection, args=(client,), name="relay", daemon=True
            ).start()

    def _drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self._cut = True
            left, cut = list(self._open), self._active
        for sock in left:  # unblocks their threads, which then close them
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2.0
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        if cut:
            log.info("%d connections were still open after the drain and were cut", cut)

    # -- one connection ---------------------------------------------------------------

    def _connection(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.setblocking(True)
            if not self._first_byte(client):
                return
            upstream = self._connect()
            if upstream is None:
                return
            with self._lock:
                cut = self._cut  # connected just after the drain ended: closed below
                self._open.add(upstream)
            if cut:
                return
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            back = threading.Thread(
                target=self._pump, args=(upstream, client), name="relay-back", daemon=True
            )
            back.start()
            self._pump(client, upstream)
            back.join()
        except _PEER_ERRORS as exc:
            self._throttled.warning(f"connection failed: {exc}")
        finally:
            with self._lock:
                self._open.discard(client)
                if upstream is not None:
                    self._open.discard(upstream)
                self._active -= 1
            client.close()
            if upstream is not None:
                upstream.close()
            self._wake()  # a slot is free: the accept loop may watch the listener again

    def _first_byte(self, client: socket.socket) -> bool:
        """Wait until the client sends something; False when it closes first (a probe)."""
        poller = select.poll()
        poller.register(client, select.POLLIN)
        if not poller.poll(self.first_byte_timeout * 1000):
            return False
        try:
            return client.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _connect(self) -> socket.socket | None:
        host, port = self.upstream
        try:
            # Resolved here, every time: a Service that moved is followed at once.
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as exc:
            self._throttled.warning(f"upstream {host}:{port} unreachable: {exc}")
            return None
        sock.settimeout(None)
        return sock

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        """Move bytes one way until EOF, then pass the half-close on."""
        try:
            if self.splice:
                _splice_all(source, target)
            else:
                _copy_all(source, target)
        except _PEER_ERRORS as exc:
            # A reset on one side ends both directions.
            if not isinstance(exc, ConnectionResetError | BrokenPipeError) and (
                getattr(exc, "errno", None) not in (errno.ENOTCONN, errno.EBADF)
            ):
                self._throttled.warning(f"relay failed: {exc}")
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def _splice_all(source: socket.socket, target: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
        src, dst = source.fileno(), target.fileno()
        while True:
            moved = os.splice(src, write_end, CHUNK, flags=os.SPLICE_F_MOVE)
            if moved == 0:
                return
            while moved:
                moved -= os.splice(read_end, dst, moved, flags=os.SPLICE_F_MOVE)
    finally:
        os.close(read_end)
        os.close(write_end)


def _copy_all(source: socket.socket, target: socket.socket) -> None:
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    while True:
        count = source.recv_into(buffer)
        if count == 0:
            return
        target.sendall(view[:count])


# --- the command ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m registry_server.node_proxy",
        description="Relay TCP connections from a node-local port to a registry's Service.",
    )
    parser.add_argument("--listen", required=True, help="host:port to accept on")
    parser.add_argument("--upstream", required=True, help="host:port to relay to")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT)
    parser.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        listen, upstream = parse_address(args.listen), parse_address(args.upstream)
        relay = Relay(
            listen,
            upstream,
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
        )
    except (ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay.serve(args.drain_seconds)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
