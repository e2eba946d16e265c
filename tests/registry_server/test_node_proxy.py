"""The node-local relay (`registry_server.node_proxy`) with real sockets on loopback.

Every test runs a real upstream (threads on 127.0.0.1) and a real Relay; the relay is
tried both with os.splice and with its recv/send fallback. The last tests start the
command itself and stop it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry_server import node_proxy

REPO_ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[socket.socket], None]


class Upstream:
    """A TCP server on loopback running `handler` for each connection, in a thread."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.handler = handler
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = int(self.server.getsockname()[1])
        self.accepted = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


def echo(conn: socket.socket) -> None:
    """Send back everything, concurrently with reading it; half-close at EOF."""
    buffer = bytearray(1 << 16)
    while True:
        count = conn.recv_into(buffer)
        if not count:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(memoryview(buffer)[:count])


def count_then_answer(conn: socket.socket) -> None:
    """Read to EOF (the client's half-close), then answer with the digest of it all."""
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    conn.sendall(f"{total} {digest.hexdigest()}".encode())


@contextlib.contextmanager
def relay_to(
    port: int, *, splice: bool = True, host: str = "127.0.0.1", **options: float
) -> Iterator[node_proxy.Relay]:
    relay = node_proxy.Relay(
        ("127.0.0.1", 0),
        (host, port),
        splice=splice,
        max_connections=int(options.pop("max_connections", 64)),
        **options,
    )
    thread = threading.Thread(target=relay.serve, args=(1.0,), daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(10)
        assert not thread.is_alive(), "the relay did not stop"


@pytest.fixture(params=["splice", "copy"])
def splice(request: pytest.FixtureRequest) -> bool:
    if request.param == "splice" and not hasattr(os, "splice"):
        pytest.skip("no os.splice on this platform")
    return bool(request.param == "splice")


def _connect(relay: node_proxy.Relay) -> socket.socket:
    return socket.create_connection(relay.address, timeout=10)


def _receive_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def test_a_large_payload_goes_both_ways_unchanged(splice: bool) -> None:
    upstream = Upstream(echo)
    payload = os.urandom(1 << 20) * 48  # 48 MiB: far more than any buffer on the way
    try:
        with relay_to(upstream.port, splice=splice) as relay, _connect(relay) as client:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(_receive_all(client)))
            reader.start()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reader.join(60)
            assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
    finally:
        upstream.close()


def test_the_client_half_close_reaches_the_upstream_and_the_answer_comes_back(
    splice: bool,
) -> None:
    upstream = Upstream(count_then_answer)
    payload = b"GET /v2/ HTTP/1.1\r\n\r\n" * 1000
    try:
        with relay_to(upstream.port, splice=splice) as relay, _connect(relay) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)  # the upstream answers only after EOF
            answer = _receive_all(client)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    finally:
        upstream.close()


def test_the_upstream_half_close_leaves_the_other_direction_open(splice: bool) -> None:
    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)  # done talking, still listening
        got = b""
        while chunk := conn.recv(1024):
            got += chunk
        heard.append(got)

    heard: list[bytes] = []
    upstream = Upstream(greet_then_listen)
    try:
        with relay_to(upstream.port, splice=splice) as relay, _connect(relay) as client:
            client.sendall(b"x")  # the relay connects upstream on the first byte
            assert _receive_all(client) == b"hello"  # EOF passed on...
            client.sendall(b"still here")  # ...and this direction still works
            client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 10
            while not heard and time.monotonic() < deadline:
                time.sleep(0.01)
        assert heard == [b"xstill here"]
    finally:
        upstream.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_upstream_closes_the_client_promptly(splice: bool) -> None:
    with relay_to(_free_port(), splice=splice) as relay, _connect(relay) as client:
        started = time.monotonic()
        client.sendall(b"GET /v2/ HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed, with or without a reset
            assert client.recv(1024) == b""
        assert time.monotonic() - started < 2.0
    assert relay.active == 0


def test_a_probe_that_sends_nothing_never_reaches_the_upstream() -> None:
    """The kubelet's tcpSocket probe connects and closes: no connection to the registry."""
    upstream = Upstream(echo)
    try:
        with relay_to(upstream.port) as relay:
            for _ in range(5):
                _connect(relay).close()
            with _connect(relay) as client:  # a real client still gets through
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
            deadline = time.monotonic() + 5
            while relay.active and time.monotonic() < deadline:
                time.sleep(0.01)
        assert upstream.accepted == 1
    finally:
        upstream.close()


def test_the_upstream_is_connected_afresh_for_every_connection() -> None:
    """Nothing is cached: an upstream that appears later (or moves) is reached at once."""
    port = _free_port()
    with relay_to(port, host="localhost") as relay:
        with _connect(relay) as client:
            client.sendall(b"x")
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""  # nothing there yet
        upstream = Upstream(echo, port)
        try:
            with _connect(relay) as client:
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
        finally:
            upstream.close()


def test_concurrent_connections_each_get_their_own_bytes(splice: bool) -> None:
    upstream = Upstream(echo)
    results: dict[int, bool] = {}

    def one(relay: node_proxy.Relay, number: int) -> None:
        payload = os.urandom(256 * 1024 + number)
        with _connect(relay) as client:
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(_receive_all(client)))
            reader.start()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reader.join(30)
        results[number] = got == [payload]

    try:
        with relay_to(upstream.port, splice=splice) as relay:
            threads = [threading.Thread(target=one, args=(relay, n)) for n in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert results == {n: True for n in range(40)}
        assert upstream.accepted == 40
    finally:
        upstream.close()


def test_connections_beyond_the_limit_wait_instead_of_failing() -> None:
    release = threading.Event()

    def hold(conn: socket.socket) -> None:
        conn.recv(1)
        release.wait(10)
        conn.sendall(b"done")

    upstream = Upstream(hold)
    try:
        with relay_to(upstream.port, max_connections=2) as relay:
            clients = [_connect(relay) for _ in range(3)]
            for client in clients:
                client.sendall(b"x")
            time.sleep(0.5)
            assert upstream.accepted == 2  # the third waits in the backlog
            assert relay.active == 2
            release.set()
            for client in clients:
                with client:
                    assert _receive_all(client) == b"done"
            assert upstream.accepted == 3
    finally:
        upstream.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:5123", ("0.0.0.0", 5123)),
        ("main.registries.svc:5000", ("main.registries.svc", 5000)),
        ("[::1]:5123", ("::1", 5123)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert node_proxy.parse_address(text) == expected


@pytest.mark.parametrize("text", ["5123", ":5123", "host:", "host:0", "host:70000", "host:x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        node_proxy.parse_address(text)


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "registry_server.node_proxy", *args],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_listening(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError("the relay did not start listening")


def test_sigterm_stops_accepting_lets_open_connections_finish_and_exits_0() -> None:
    release = threading.Event()

    def slow(conn: socket.socket) -> None:
        conn.recv(1)
        release.wait(10)
        conn.sendall(b"finished")

    upstream = Upstream(slow)
    port = _free_port()
    process = _start(
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream.port}",
        "--drain-seconds", "10",
    )  # fmt: skip
    try:
        _wait_listening(port, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"x")
            deadline = time.monotonic() + 5
            while upstream.accepted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(OSError):  # no longer accepting
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            assert process.poll() is None  # still draining the open connection
            release.set()
            assert _receive_all(client) == b"finished"
        assert process.wait(10) == 0
        assert "relaying 127.0.0.1" in (process.stderr.read() if process.stderr else "")
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
        upstream.close()


def test_a_connection_still_open_after_the_drain_is_cut() -> None:
    def stall(conn: socket.socket) -> None:
        conn.recv(1)
        time.sleep(30)

    upstream = Upstream(stall)
    port = _free_port()
    process = _start(
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream.port}",
        "--drain-seconds", "0.5",
    )  # fmt: skip
    try:
        _wait_listening(port, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"x")
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
            assert time.monotonic() - started < 5
            assert _receive_all(client) == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        upstream.close()


def test_a_bad_address_exits_2() -> None:
    process = _start("--listen", "nowhere", "--upstream", "127.0.0.1:5000")
    assert process.wait(15) == 2
    assert "cannot start" in (process.stderr.read() if process.stderr else "")
