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

With ``--upstream-ca`` the hop to the registry is TLS, verified: the relay keeps taking
plain HTTP on 127.0.0.1 (what containerd speaks to localhost without node configuration)
and originates TLS to the registry, checking its certificate against that CA and its name
against ``--upstream-server-name`` (default: the upstream host). Such a connection is
driven by one thread (an SSL object must not be used from two at once) that copies
plaintext to and from TLS records; splice cannot apply, so it costs CPU
(docs/architecture.md, "Node proxy"). The CA file is read again when it changes.

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
import ssl
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


class UpstreamTls:
    """How the relay speaks TLS to the registry: the CA it trusts, the name it expects,
    and an optional client certificate (a registry with http.tls.client_ca)."""

    def __init__(
        self,
        ca_file: str,
        server_name: str,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.ca_file = ca_file
        self.server_name = server_name
        self.cert_file = cert_file
        self.key_file = key_file
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple[object, ...] = ()
        self.context()  # unreadable files stop the start-up

    def _files_stamp(self) -> tuple[object, ...]:
        stamps: list[object] = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is None:
                continue
            try:
                st = os.stat(path)  # follows the kubelet's ..data link
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def context(self) -> ssl.SSLContext:
        """The client context, built again when a file changed (a rotated CA)."""
        stamp = self._files_stamp()
        with self._lock:
            if self._context is not None and stamp == self._stamp:
                return self._context
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                if self.cert_file:
                    context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise
                log.error("upstream TLS files refused, keeping the last good ones: %s", exc)
                self._stamp = stamp
                return self._context
            self._context, self._stamp = context, stamp
            return context


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
        tls: UpstreamTls | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.upstream = upstream
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.splice = splice
        self.tls = tls
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
                # The TCP socket's own shutdown: an SSLSocket's would drop its SSL state
                # under the thread still using it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
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
            if isinstance(upstream, ssl.SSLSocket):
                self._relay_tls(client, upstream)
                return
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
        if self.tls is not None:
            try:
                sock = self.tls.context().wrap_socket(sock, server_hostname=self.tls.server_name)
            except (OSError, ssl.SSLError) as exc:  # a refused certificate among them
                sock.close()
                self._throttled.warning(f"upstream {host}:{port} TLS handshake failed: {exc}")
                return None
        sock.settimeout(None)
        return sock

    def _relay_tls(self, client: socket.socket, upstream: ssl.SSLSocket) -> None:
        """Both directions in this thread: plaintext from the client into TLS records to
        the registry, and back (see ``_tls_loop`` for how each side's close is passed)."""
        try:
            _tls_loop(client, upstream)
        except _PEER_ERRORS as exc:
            if not isinstance(exc, ConnectionResetError | BrokenPipeError):
                self._throttled.warning(f"relay failed: {exc}")
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

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


_TLS_BUFFER = 1 << 20  # bytes held per direction before reading that side pauses
_TLS_RECORD = 16 * 1024  # TLS's largest record: one SSL read returns at most this


def _tls_loop(client: socket.socket, tls: ssl.SSLSocket) -> None:
    """Copy between ``client`` (plain) and ``tls`` until both directions ended, with both
    sockets non-blocking and poll(2) waiting whenever no side can move. The client's
    EOF becomes a close_notify that ends the connection; the registry's close becomes a
    TCP half-close to the client."""
    client.setblocking(False)
    tls.setblocking(False)
    up = bytearray()  # client -> registry, not yet written into TLS
    down = bytearray()  # registry -> client, not yet sent
    up_write = 0  # a TLS write that wanted to be retried must be retried with this length
    client_eof = tls_eof = up_closed = down_closed = False
    tls_wants_write = False
    poller = select.poll()
    while not (up_closed and down_closed):
        moved = False
        if not client_eof and len(up) < _TLS_BUFFER:
            try:
                data = client.recv(256 * 1024)
                moved = True
                if data:
                    up += data
                else:
                    client_eof = True
            except BlockingIOError:
                pass
        while not tls_eof and len(down) < _TLS_BUFFER:
            try:
                data = tls.recv(_TLS_RECORD)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                tls_wants_write = True
                break
            moved = True
            if data:
                down += data
            else:
                tls_eof = True
        if up and not up_closed:
            length = up_write or min(len(up), _TLS_RECORD * 4)
            try:
                sent = tls.send(up[:length])
                del up[:sent]
                up_write = 0
                tls_wants_write = False
                moved = True
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                up_write = length
                tls_wants_write = True
        if down and not down_closed:
            try:
                sent = client.send(down)
                del down[:sent]
                moved = True
            except BlockingIOError:
                pass
        if client_eof and not up and not up_closed:
            # The client's EOF ends the connection: TLS has no half-close OpenSSL keeps
            # reading after (a bare TCP FIN is a truncation it answers with a fatal alert,
            # and after its own close_notify it refuses data). HTTP clients close both
            # ways anyway. What the registry sent so far still reaches the client.
            try:
                if not tls_eof:
                    tls.unwrap()
                up_closed = tls_eof = True
            except ssl.SSLWantReadError:  # sent; the registry's answer is not awaited
                up_closed = tls_eof = True
            except ssl.SSLWantWriteError:
                tls_wants_write = True
        if tls_eof and not down and not down_closed:
            down_closed = True
            client.shutdown(socket.SHUT_WR)
        if moved:
            continue
        client_events = (0 if client_eof or len(up) >= _TLS_BUFFER else select.POLLIN) | (
            select.POLLOUT if down else 0
        )
        tls_events = (0 if tls_eof or len(down) >= _TLS_BUFFER else select.POLLIN) | (
            select.POLLOUT if tls_wants_write else 0
        )
        # Only what is waited for is registered: a socket with no events would still
        # report POLLHUP and turn this into a busy loop.
        watched = [(sock, ev) for sock, ev in ((client, client_events), (tls, tls_events)) if ev]
        for sock, events in watched:
            poller.register(sock, events)
        poller.poll()
        for sock, _ in watched:
            poller.unregister(sock)


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
    parser.add_argument(
        "--upstream-ca", default=None, help="speak TLS to the upstream, trusting this CA file"
    )
    parser.add_argument(
        "--upstream-server-name", default=None, help="the name its certificate must have"
    )
    parser.add_argument("--upstream-cert", default=None, help="client certificate (mutual TLS)")
    parser.add_argument("--upstream-key", default=None, help="its key")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        listen, upstream = parse_address(args.listen), parse_address(args.upstream)
        tls = None
        if args.upstream_ca:
            tls = UpstreamTls(
                args.upstream_ca,
                args.upstream_server_name or upstream[0],
                args.upstream_cert,
                args.upstream_key,
            )
        elif args.upstream_cert or args.upstream_server_name:
            raise ValueError("--upstream-cert and --upstream-server-name need --upstream-ca")
        relay = Relay(
            listen,
            upstream,
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
            tls=tls,
        )
    except (ValueError, OSError, ssl.SSLError) as exc:
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
