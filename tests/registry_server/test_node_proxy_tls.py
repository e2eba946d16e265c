"""The node-local relay originating TLS to the registry (``--upstream-ca``), real sockets.

The client side stays plain (containerd speaks HTTP to localhost); the upstream is a TLS
server in threads with a certificate from a CA made here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry_server import node_proxy
from tests.registry_server.test_node_proxy import Upstream
from tests.support.control_plane import CertificateAuthority, KeyPair
from tests.support.tls import serving_pair


def _tls_handler(
    pair: KeyPair, inner: Callable[[socket.socket], None], client_ca: Path | None = None
) -> Callable[[socket.socket], None]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED

    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            inner(tls)

    return handle


def tls_echo(conn: socket.socket) -> None:
    buffer = bytearray(1 << 16)
    while True:
        count = conn.recv_into(buffer)
        if not count:  # the relay's close_notify: answer it, as a TLS server does
            assert isinstance(conn, ssl.SSLSocket)
            conn.unwrap()
            return
        conn.sendall(memoryview(buffer)[:count])


@contextlib.contextmanager
def relay_tls(port: int, tls: node_proxy.UpstreamTls) -> Iterator[node_proxy.Relay]:
    relay = node_proxy.Relay(("127.0.0.1", 0), ("127.0.0.1", port), tls=tls)
    thread = threading.Thread(target=relay.serve, args=(1.0,), daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(10)
        assert not thread.is_alive(), "the relay did not stop"


def _exchange(relay: node_proxy.Relay, payload: bytes, expect: int | None = None) -> bytes:
    """Send ``payload`` and read until ``expect`` bytes came back (default: as many as
    sent) or the connection ended; then close. HTTP clients never half-close."""
    want = len(payload) if expect is None else expect
    with socket.create_connection(relay.address, timeout=20) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
        sender.start()
        parts, got = [], 0
        # A refused upstream: closed with the request unread, which the kernel makes a reset.
        with contextlib.suppress(ConnectionResetError):
            while got < want and (chunk := client.recv(1 << 16)):
                parts.append(chunk)
                got += len(chunk)
        sender.join(20)
        return b"".join(parts)


def answer_then_close(conn: socket.socket) -> None:
    """An HTTP/1.0-like exchange: a request line in, one reply out, then the upstream closes."""
    request = conn.recv(1 << 16)
    conn.sendall(b"got " + hashlib.sha256(request).hexdigest().encode())


def test_a_large_payload_goes_both_ways_through_tls(ca: CertificateAuthority) -> None:
    upstream = Upstream(_tls_handler(serving_pair(ca, "registry"), tls_echo))
    payload = os.urandom(1 << 20) * 24
    try:
        with relay_tls(upstream.port, node_proxy.UpstreamTls(str(ca.cert_path), "localhost")) as r:
            back = _exchange(r, payload)
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            # The upstream's close reaches the client as EOF after its reply.
            upstream.handler = _tls_handler(serving_pair(ca, "again"), answer_then_close)
            with socket.create_connection(r.address, timeout=20) as client:
                client.sendall(b"ping")
                reply = b"".join(iter(lambda: client.recv(1 << 16), b""))
            assert reply == b"got " + hashlib.sha256(b"ping").hexdigest().encode()
            # A client that goes away ends the connection upstream too (a close_notify).
            upstream.handler = _tls_handler(serving_pair(ca, "echo"), tls_echo)
            before = r.active
            with socket.create_connection(r.address, timeout=20) as client:
                client.sendall(b"x")
                assert client.recv(1) == b"x"
            deadline = time.monotonic() + 5
            while r.active > before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert r.active == before
    finally:
        upstream.close()


@pytest.mark.parametrize("case", ["wrong name", "untrusted"])
def test_a_certificate_that_fails_verification_closes_the_client(
    ca: CertificateAuthority, tmp_path: Path, case: str
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = CertificateAuthority(other_dir, "other")
    pair = (
        ca.issue("wrong", "elsewhere", server_names=["elsewhere.example"])
        if case == "wrong name"
        else serving_pair(other, "untrusted")
    )
    upstream = Upstream(_tls_handler(pair, tls_echo))
    try:
        with relay_tls(upstream.port, node_proxy.UpstreamTls(str(ca.cert_path), "localhost")) as r:
            assert _exchange(r, b"GET /v2/ HTTP/1.1\r\n\r\n", expect=1) == b""
    finally:
        upstream.close()


def test_a_client_certificate_and_a_rotated_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    relay_pair = ca.issue("relay", "node-proxy", client=True)
    upstream = Upstream(_tls_handler(serving_pair(ca, "s"), tls_echo, client_ca=ca.cert_path))
    trusted = tmp_path / "trusted.crt"
    shutil.copy(ca.cert_path, trusted)
    tls = node_proxy.UpstreamTls(
        str(trusted), "127.0.0.1", str(relay_pair.cert), str(relay_pair.key)
    )
    try:
        with relay_tls(upstream.port, tls) as r:
            assert _exchange(r, b"ping") == b"ping"
            # A new CA (the operator renewed it): new connections trust it at once.
            new_dir = tmp_path / "new"
            new_dir.mkdir()
            new = CertificateAuthority(new_dir, "renewed")
            upstream.handler = _tls_handler(serving_pair(new, "s2"), tls_echo)
            assert _exchange(r, b"ping", expect=1) == b""
            staged = tmp_path / "trusted.new"
            staged.write_bytes(new.cert_path.read_bytes())
            os.replace(staged, trusted)
            assert _exchange(r, b"ping") == b"ping"
    finally:
        upstream.close()
