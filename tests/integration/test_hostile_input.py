"""Hostile bytes against a real berth process, over raw sockets.

What aiohttp's client refuses to send (header bytes that are not ASCII or not UTF-8,
requests its parser refuses) goes out byte for byte here. Every answer must be a client
error in the spec's format, with a code from the spec's list, never a 500 or plain text;
the token endpoint answers with its OAuth2 error body instead.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.support.clients import (
    SPEC_CODES,
    Registry,
    peak_rss_bytes,
    raw_connection,
    raw_replies,
    read_until_closed,
    sha256,
)
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


class Reply:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        response = http.client.HTTPResponse(_FakeSocket(raw))  # type: ignore[arg-type]
        response.begin()
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def __repr__(self) -> str:
        return f"Reply({self.raw[:600]!r})"

    def json(self) -> Any:
        assert (self.headers.get("Content-Type") or "").startswith("application/json"), self
        return json.loads(self.body)

    def spec_error(self, status: int | None = None) -> str:
        """The spec's error body; returns its first code."""
        if status is not None:
            assert self.status == status, self
        assert 400 <= self.status < 500, self
        errors = self.json()["errors"]
        assert isinstance(errors, list) and errors, self
        code: str = errors[0]["code"]
        assert code in SPEC_CODES, self
        assert isinstance(errors[0]["message"], str), self
        return code


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *_: Any, **__: Any) -> io.BytesIO:
        return self._file


def send(registry: RegistryProcess, data: bytes, timeout: float = 10.0) -> Reply:
    """One raw request on its own connection; the reply, read until the server closes."""
    received = raw_replies(registry.url, data, timeout)
    assert received, f"no reply to {data[:200]!r}"
    return Reply(received)


def request(
    registry: RegistryProcess,
    line: bytes,
    headers: list[bytes] = [],  # noqa: B006 - never mutated
    body: bytes = b"",
) -> Reply:
    head = [line, f"Host: {registry.host}".encode(), b"Connection: close", *headers]
    if body:
        head.append(b"Content-Length: %d" % len(body))
    return send(registry, b"\r\n".join(head) + b"\r\n\r\n" + body)


# -- Authorization that does not decode ----------------------------------------------------

PASSWORD = "alice-password"

UNDECODABLE_AUTH = {
    "basic-raw-bytes": b"Basic \xff\xfe\xfd",
    "basic-raw-utf8": "Basic é".encode(),
    "basic-base64-of-non-utf8": b"Basic " + base64.b64encode(b"al\xffce:" + PASSWORD.encode()),
    "basic-base64-with-raw-byte": b"Basic YWxp\xffY2U6cHc=",
    "bearer-raw-bytes": b"Bearer \xff\xfe.\xfd.\xfc",
    "bearer-raw-utf8": "Bearer é.é.é".encode(),
    "bearer-base64-of-non-utf8": b"Bearer "
    + b".".join(base64.urlsafe_b64encode(p).rstrip(b"=") for p in (b"\xff\xfe", b"\xff", b"x")),
    "scheme-raw-bytes": b"\xff\xfe abc",
}


@pytest.fixture
def secured(registry_process: Start, tmp_path: Path) -> RegistryProcess:
    htpasswd = tmp_path / "htpasswd"
    secret_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    htpasswd.write_text(f"alice:{secret_hash}\n")
    # No failure limit: every case must reach the decoding, not a 429.
    auth = {"htpasswd": str(htpasswd), "failure_limit": 0}
    return registry_process("berth", config={"auth": auth})


@pytest.mark.parametrize("case", sorted(UNDECODABLE_AUTH))
def test_undecodable_authorization_is_401(secured: RegistryProcess, case: str) -> None:
    header = b"Authorization: " + UNDECODABLE_AUTH[case]
    for path in (
        b"/v2/",
        b"/v2/a/b/manifests/v1",
        b"/v2/a/b/blobs/" + sha256(b"x").encode(),
        b"/v2/_catalog",
        b"/berth/v1/replication/status",
    ):
        reply = request(secured, b"GET " + path + b" HTTP/1.1", [header])
        assert reply.spec_error(401) == "UNAUTHORIZED", (path, reply)
        assert (reply.headers.get("WWW-Authenticate") or "").startswith("Bearer realm="), reply
    reply = request(secured, b"GET /token?service=berth&scope=repository:a:pull HTTP/1.1", [header])
    assert reply.status in (400, 401), reply
    assert "error" in reply.json(), reply
    # The server is still fine, and the right credentials still work.
    good = base64.b64encode(f"alice:{PASSWORD}".encode())
    assert request(secured, b"GET /v2/ HTTP/1.1", [b"Authorization: Basic " + good]).status == 200


# -- other header values ---------------------------------------------------------------------


@pytest.fixture
def registry(registry_process: Start) -> RegistryProcess:
    return registry_process("berth")


def _manifest(api: Registry, repo: str) -> bytes:
    config = b"{}"
    api.push_blob(repo, config)
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()


@pytest.mark.parametrize(
    ("version", "origin"),
    [
        (b"5", b"\xff\xfe"),
        (b"5", "é".encode()),
        ("\u0661\u0662".encode(), b"eu"),
        (b"99999999999999999999999999999", b"eu"),
        (b"\xff", b"eu"),
    ],
    ids=["origin-bytes", "origin-utf8", "version-arabic-digits", "version-huge", "version-bytes"],
)
def test_bad_replication_stamp_headers_are_400(
    registry: RegistryProcess, version: bytes, origin: bytes
) -> None:
    api = Registry(registry.url)
    manifest = _manifest(api, "stamp/repo")
    reply = request(
        registry,
        b"PUT /v2/stamp/repo/manifests/v1 HTTP/1.1",
        [
            b"Content-Type: application/vnd.oci.image.manifest.v1+json",
            b"Berth-Replication-Version: " + version,
            b"Berth-Replication-Origin: " + origin,
        ],
        manifest,
    )
    reply.spec_error(400)
    assert api.tags("stamp/repo") == []
    reply = request(
        registry,
        b"DELETE /v2/stamp/repo/manifests/" + sha256(manifest).encode() + b" HTTP/1.1",
        [b"Berth-Replication-Version: " + version, b"Berth-Replication-Origin: " + origin],
    )
    reply.spec_error(400)


def test_non_ascii_ranges_are_refused(registry: RegistryProcess) -> None:
    api = Registry(registry.url)
    data = bytes(range(100))
    digest = api.push_blob("range/repo", data).encode()
    for value in ("bytes=\u0660-\u0669".encode(), b"bytes=\xff-", b"bytes=-\xff"):
        reply = request(
            registry, b"GET /v2/range/repo/blobs/" + digest + b" HTTP/1.1", [b"Range: " + value]
        )
        reply.spec_error(416)
        assert reply.headers.get("Content-Range") == "bytes */100", reply
    location = api.start_upload("range/up").encode()
    for value in ("\u0660-\u0669".encode(), b"\xff-\xfe", b"0-\xff"):
        reply = request(
            registry,
            b"PATCH " + location + b" HTTP/1.1",
            [b"Content-Range: " + value, b"Content-Type: application/octet-stream"],
            b"0123456789",
        )
        reply.spec_error(416)
    assert api.get(location.decode()).header("Range") == "0-0"


def test_non_ascii_page_size_is_refused(registry: RegistryProcess) -> None:
    for path in (b"/v2/_catalog?n=%D9%A1", b"/v2/a/tags/list?n=%D9%A1", b"/v2/_catalog?n=%ff"):
        request(registry, b"GET " + path + b" HTTP/1.1").spec_error(400)


# -- routes and methods ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "status", "code"),
    [
        (b"GET /v2//manifests/x HTTP/1.1", 400, "NAME_INVALID"),
        (b"PUT /v2//manifests/x HTTP/1.1", 400, "NAME_INVALID"),
        (b"GET /v2/a/b/referrers/ HTTP/1.1", 400, "DIGEST_INVALID"),
        (b"GET /v2/a/b/referrers/sha256:abc%2Fdef HTTP/1.1", 400, "DIGEST_INVALID"),
        (b"GET /v2/a/b/referrers/sha256:abc/def HTTP/1.1", 400, "DIGEST_INVALID"),
        (b"GET /nope HTTP/1.1", 404, None),
        (b"GET /v2/a/b/nope HTTP/1.1", 404, None),
        (b"POST /v2/_catalog HTTP/1.1", 405, None),
        (b"DELETE /token HTTP/1.1", 405, None),
        (b"PUT /healthz HTTP/1.1", 405, None),
    ],
)
def test_unknown_routes_answer_in_the_spec_format(
    registry: RegistryProcess, line: bytes, status: int, code: str | None
) -> None:
    found = request(registry, line).spec_error(status)
    assert code is None or found == code


# -- requests the HTTP parser refuses ------------------------------------------------------------

PARSER_REFUSED = {
    "control-char-in-path": b"GET /v2/\x01 HTTP/1.1",
    "raw-byte-in-path": b"GET /v2/a\xff/tags/list HTTP/1.1",
    "raw-byte-in-query": b"POST /v2/a/b/blobs/uploads/?digest=\xff HTTP/1.1",
    "del-in-query": b"GET /v2/?a=\x7f HTTP/1.1",
    "unknown-method": b"FOO /v2/ HTTP/1.1",
    "raw-byte-in-method": b"G\xffT /v2/ HTTP/1.1",
    "bad-version": b"GET /v2/ HTTP/9.x",
}
PARSER_REFUSED_HEADERS = {
    "content-length-not-a-number": [b"Content-Length: abc"],
    "content-length-negative": [b"Content-Length: -1"],
    "content-length-twice": [b"Content-Length: 1", b"Content-Length: 2"],
    "header-without-colon": [b"Foo"],
    "bad-transfer-encoding": [b"Transfer-Encoding: \xff"],
    "space-before-colon": [b"Content-Length : 5"],
    "header-too-long": [b"X-Big: " + b"a" * 20000],
}


def _refused(reply: Reply) -> None:
    assert reply.raw.startswith(b"HTTP/1."), reply
    code = reply.spec_error()
    assert code == "UNSUPPORTED", reply
    assert reply.headers.get("Docker-Distribution-API-Version") == "registry/2.0", reply


@pytest.mark.parametrize("case", sorted(PARSER_REFUSED))
def test_request_lines_the_parser_refuses(registry: RegistryProcess, case: str) -> None:
    line = PARSER_REFUSED[case]
    _refused(send(registry, line + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n"))


@pytest.mark.parametrize("case", sorted(PARSER_REFUSED_HEADERS))
def test_headers_the_parser_refuses(registry: RegistryProcess, case: str) -> None:
    headers = PARSER_REFUSED_HEADERS[case]
    _refused(request(registry, b"PUT /v2/a/b/manifests/v1 HTTP/1.1", headers))


def test_server_survives_hostile_input(registry: RegistryProcess) -> None:
    for case in PARSER_REFUSED.values():
        send(registry, case + b"\r\n\r\n")
    assert Registry(registry.url).get("/v2/").status == 200
    assert registry.running
    assert not re.search(r"Traceback", registry.log_tail(400)), registry.log_tail(400)


# -- bodies the server does not take ---------------------------------------------------------

MiB = 1 << 20
BIG = 48 * MiB


def send_big(registry: RegistryProcess, line: bytes, headers: list[bytes], chunked: bool) -> Reply:
    """A request with a 48 MiB body, sent as fast as the server takes it; its reply."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % BIG
    head = [line, f"Host: {registry.host}".encode(), b"Connection: close", framing, *headers]
    chunk = b"x" * MiB
    with raw_connection(registry.url, 30) as sock:
        try:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            for _ in range(BIG // MiB):
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before the end: fine, the reply is what counts
        received = read_until_closed(sock)
    assert received, f"no reply to {line!r}"
    return Reply(received)


def _peak_rss(registry: RegistryProcess) -> int:
    assert registry.process.pid is not None
    return peak_rss_bytes(registry.process.pid)


OPEN_REFUSALS = [
    (b"POST /berth/v1/replication/hashes HTTP/1.1", 413),  # open access: read, but bounded
    (b"PUT /v2/big/repo/manifests/v1 HTTP/1.1", 413),
    (b"POST /v2/_catalog HTTP/1.1", 405),
    (b"POST /v2/big/repo/manifests/v1 HTTP/1.1", 405),
    (b"POST /healthz HTTP/1.1", 405),
    (b"POST /nope HTTP/1.1", 404),
    (b"PATCH /v2/big/repo/blobs/uploads/" + b"0" * 8 + b"-0000-4000-8000-" + b"0" * 12, 404),
]
SECURED_REFUSALS = [
    (b"POST /v2/big/repo/blobs/uploads/?digest=" + sha256(b"x").encode() + b" HTTP/1.1", 401),
    (b"PUT /v2/big/repo/manifests/v1 HTTP/1.1", 401),
    (b"POST /berth/v1/replication/hashes HTTP/1.1", 401),
    (b"POST /token HTTP/1.1", 413),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_refused_bodies_are_not_held_in_memory(
    registry: RegistryProcess, secured: RegistryProcess, chunked: bool
) -> None:
    """One 48 MiB body to each endpoint that refuses it: by route, method, size or auth.
    None is read into memory, so the server's peak memory barely moves."""
    cases = [(registry, line, status) for line, status in OPEN_REFUSALS]
    cases += [(secured, line, status) for line, status in SECURED_REFUSALS]
    for server in (registry, secured):
        assert Registry(server.url).get("/v2/").status in (200, 401)  # warm
    before = {server.port: _peak_rss(server) for server in (registry, secured)}
    answers = []
    for server, line, status in cases:
        if not line.endswith(b"HTTP/1.1"):
            line += b" HTTP/1.1"
        headers = [b"Content-Type: application/x-www-form-urlencoded"]
        reply = send_big(server, line, headers, chunked)
        answers.append((line, status, reply.status, reply))
    grown = {
        server.port: (_peak_rss(server) - before[server.port]) // MiB
        for server in (registry, secured)
    }
    print(f"peak RSS growth (MiB) by port: {grown}")
    assert all(growth < 16 for growth in grown.values()), grown
    assert [a for a in answers if a[1] != a[2]] == []
    assert Registry(registry.url).get("/v2/").status == 200
