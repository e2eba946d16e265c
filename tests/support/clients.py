"""Driving a registry from tests: the client CLIs, raw HTTP, and checks on its storage.

- `run_tool("crane", ...)` (and `skopeo`, `crane`, `oras`) runs a client binary and fails
  the test with its output when it exits non-zero;
- `Registry(url)` speaks the distribution API over `http.client` with one connection per
  request and sends paths exactly as given (no dot-segment normalisation), so tests can
  send names like `../x`;
- `send_truncated` writes a request head and part of its body on a raw socket, then
  drops the connection; `raw_replies` writes raw requests and returns all the server
  answers until it closes (`raw_connection` and `read_until_closed` are its two halves);
- `assert_error` checks the spec's error shape (`SPEC_CODES` are the spec's error codes),
  `blob_tree_problems` hashes every file under `<root>/blobs`, `peak_rss_bytes` reads a
  process's high-water RSS.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from .tools import require_tool

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

# -- client binaries ----------------------------------------------------------------------


def run_tool(
    name: str,
    *args: str | os.PathLike[str],
    timeout: float = 180.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a test tool; with `check`, a non-zero exit fails the test showing its output."""
    argv = [str(require_tool(name)), *(os.fspath(a) for a in args)]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def skopeo(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("skopeo", "--insecure-policy", *args, check=check)


def crane(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("crane", *args, "--insecure", check=check)


def oras(
    *args: str | os.PathLike[str], check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_tool("oras", *args, check=check, cwd=cwd)


# -- content ------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def image_manifest(
    config: bytes, layers: Iterable[bytes], *, subject: dict[str, Any] | None = None, **extra: Any
) -> bytes:
    """An OCI image manifest over the given config and layer bytes."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        **extra,
    }
    if subject is not None:
        doc["subject"] = subject
    return canonical_json(doc)


def image_index(children: Iterable[bytes]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_MANIFEST, child) for child in children],
        }
    )


def pattern_chunks(total: int, chunk_size: int = 1 << 20, seed: int = 0) -> Iterator[bytes]:
    """`total` bytes of distinct-looking content, generated chunk by chunk (never held whole).

    Each chunk is a fixed pseudo-random block with its index stamped in the first bytes, so
    two runs with the same arguments give the same bytes and hence the same digest.
    """
    base = hashlib.sha256(f"block:{seed}".encode()).digest()
    block = (base * (chunk_size // len(base) + 1))[:chunk_size]
    sent = 0
    number = 0
    while sent < total:
        size = min(chunk_size, total - sent)
        chunk = (struct.pack("<QQ", seed, number) + block[16:])[:size]
        yield chunk
        sent += size
        number += 1


def digest_of_chunks(chunks: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


# -- raw HTTP -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {dict(self.headers)!r}, {self.body[:300]!r})"


@dataclass
class Registry:
    """The distribution API over plain HTTP, one connection per request."""

    url: str
    timeout: float = 60.0
    default_headers: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send `path` verbatim; an iterable body goes out with chunked transfer encoding."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, self.timeout)
        try:
            all_headers = {**self.default_headers, **(headers or {})}
            if body is None and method in ("PUT", "POST", "PATCH"):
                all_headers.setdefault("Content-Length", "0")
            chunked = body is not None and not isinstance(body, bytes)
            conn.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
            raw = conn.getresponse()
            data = raw.read()
            return Response(raw.status, raw.headers, data)
        finally:
            conn.close()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("GET", path, headers=headers)

    def head(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("HEAD", path, headers=headers)

    # -- blobs --------------------------------------------------------------------------

    def start_upload(self, repo: str) -> str:
        """POST a new upload session; returns its Location path."""
        response = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert response.status == 202, response
        location = response.header("Location")
        assert location, response
        return location_path(location)

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic push (POST, then PUT with the body); returns the digest."""
        digest = sha256(data)
        location = self.start_upload(repo)
        response = self.request(
            "PUT",
            with_query(location, digest=digest),
            data,
            {"Content-Type": "application/octet-stream"},
        )
        assert response.status == 201, response
        assert response.header("Docker-Content-Digest") == digest, response
        return digest

    def patch(self, location: str, data: bytes, start: int | None = None) -> Response:
        headers = {"Content-Type": "application/octet-stream"}
        if start is not None:
            headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
        return self.request("PATCH", location, data, headers)

    def finish(self, location: str, digest: str, data: bytes | None = None) -> Response:
        return self.request(
            "PUT",
            with_query(location, digest=digest),
            data,
            {"Content-Type": "application/octet-stream"},
        )

    def blob_exists(self, repo: str, digest: str) -> bool:
        status = self.head(f"/v2/{repo}/blobs/{digest}").status
        assert status in (200, 404), status
        return status == 200

    def blob(self, repo: str, digest: str) -> bytes:
        response = self.get(f"/v2/{repo}/blobs/{digest}")
        assert response.status == 200, response
        return response.body

    # -- manifests ----------------------------------------------------------------------

    def put_manifest(
        self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST
    ) -> Response:
        return self.request(
            "PUT", f"/v2/{repo}/manifests/{reference}", body, {"Content-Type": media_type}
        )

    def push_manifest(
        self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST
    ) -> str:
        response = self.put_manifest(repo, reference, body, media_type)
        assert response.status == 201, response
        assert response.header("Docker-Content-Digest") == sha256(body), response
        return sha256(body)

    def push_image(
        self, repo: str, tag: str, layers: Iterable[bytes] = (), config: bytes | None = None
    ) -> tuple[str, bytes]:
        """Blobs, then an image manifest under `tag`; returns (digest, manifest bytes)."""
        layers = list(layers)
        config = config if config is not None else canonical_json({"tag": tag, "repo": repo})
        for blob in (config, *layers):
            self.push_blob(repo, blob)
        manifest = image_manifest(config, layers)
        return self.push_manifest(repo, tag, manifest), manifest

    def manifest(self, repo: str, reference: str) -> Response:
        return self.get(f"/v2/{repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT})

    # -- discovery ----------------------------------------------------------------------

    def tags(self, repo: str) -> list[str] | None:
        """The tag list, or None when the repository is unknown (404 NAME_UNKNOWN)."""
        response = self.get(f"/v2/{repo}/tags/list")
        if response.status == 404:
            assert_error(response, 404, "NAME_UNKNOWN")
            return None
        assert response.status == 200, response
        tags: list[str] | None = response.json()["tags"]
        return sorted(tags or [])

    def catalog(self) -> list[str]:
        response = self.get("/v2/_catalog")
        assert response.status == 200, response
        repositories: list[str] = response.json()["repositories"]
        return repositories

    def snapshot(self, repos: Iterable[str] = ()) -> dict[str, Any]:
        """What a client can see: the catalog and, per repository, tags and their digests."""
        state: dict[str, Any] = {"catalog": self.catalog()}
        for repo in sorted({*state["catalog"], *repos}):
            tags = self.tags(repo)
            resolved = {}
            for tag in tags or []:
                response = self.head(f"/v2/{repo}/manifests/{tag}")
                resolved[tag] = response.header("Docker-Content-Digest")
            state[repo] = resolved if tags is not None else None
        return state


def location_path(location: str) -> str:
    """The path (and query) of a Location header, absolute or relative."""
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_query(location: str, **params: str) -> str:
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}{urlencode(params)}"


# The error codes of the OCI distribution spec (and of Docker's registry API v2).
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


def assert_error(
    response: Response, status: int, code: str | Iterable[str] | None = None
) -> dict[str, Any]:
    """The response is the spec's error: `status` and `{"errors": [{"code", "message"}]}`."""
    assert response.status == status, response
    if response.header("Content-Length") == "0" and not response.body:
        raise AssertionError(f"error response without a body: {response!r}")
    content_type = (response.header("Content-Type") or "").split(";")[0].strip()
    assert content_type == "application/json", response
    payload: dict[str, Any] = response.json()
    errors = payload.get("errors")
    assert isinstance(errors, list) and errors, payload
    for entry in errors:
        assert isinstance(entry, dict), payload
        assert isinstance(entry.get("code"), str), payload
        assert isinstance(entry.get("message"), str), payload
    if code is not None:
        wanted = {code} if isinstance(code, str) else set(code)
        assert errors[0]["code"] in wanted, payload
    return payload


def send_truncated(
    url: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    partial_body: bytes,
    *,
    pause: float = 0.2,
) -> None:
    """Send a request head and only `partial_body` of its declared body, then drop the socket.

    `headers` must declare the full Content-Length. The pause lets the server start
    reading the body before the connection goes away.
    """
    data = request_bytes(url, method, path, headers, partial_body)
    with raw_connection(url) as sock:
        sock.sendall(data)
        time.sleep(pause)
        # Abort (RST) rather than a graceful FIN: the server must not see a complete request.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def raw_replies(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Write `data` (raw requests) on a socket; everything the server sends until it closes."""
    with raw_connection(url, timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def raw_connection(url: str, timeout: float = 10.0) -> socket.socket:
    """A plain TCP connection to the server of `url`, for writing requests byte by byte."""
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on `sock` until it closes it (or resets, or times out)."""
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(received)


def request_bytes(
    url: str, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
) -> bytes:
    """A raw HTTP/1.1 request, headers exactly as given (nothing added but Host)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def wait_for(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check()` until it returns something truthy; returns it, or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(interval)


# -- the server's storage and process ------------------------------------------------------


def blob_files(root: Path) -> list[Path]:
    """Every file under `<root>/blobs`."""
    blobs = root / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []


def blob_file(root: Path, digest: str) -> Path:
    algorithm, _, hex_digest = digest.partition(":")
    return root / "blobs" / algorithm / hex_digest[:2] / hex_digest / "data"


def cached_blob(root: Path, digest: str, timeout: float = 10.0) -> bytes:
    """The bytes a pull through the cache stored for ``digest``. The fill commits its
    file after it has streamed the last byte to the client, so a client can be done
    a moment before the file is in place: waited for, not assumed."""
    path = blob_file(root, digest)
    wait_for(path.is_file, timeout=timeout)
    return path.read_bytes()


def blob_tree_problems(root: Path) -> list[str]:
    """Files under `<root>/blobs` that are not `<alg>/<xx>/<hex>/data` holding that digest."""
    problems = []
    for path in blob_files(root):
        rel = path.relative_to(root / "blobs").parts
        if len(rel) != 4 or rel[3] != "data" or rel[1] != rel[2][:2]:
            problems.append(f"unexpected file {path}")
            continue
        algorithm, hex_digest = rel[0], rel[2]
        hasher = hashlib.new(algorithm)
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        if hasher.hexdigest() != hex_digest:
            problems.append(f"{path}: content hashes to {algorithm}:{hasher.hexdigest()}")
    return problems


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def stalled_request(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` (headers and the start of a body it promises more of), then
    nothing: the server's answer, as status and body, read within 5 s."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            status = int((await reader.readline()).split()[1])
            head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            return status, await reader.readexactly(length)
    finally:
        writer.close()
