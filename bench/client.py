"""The load generator: `python -m bench.client`, one job per process.

It runs in its own process(es), apart from the servers, with aiohttp's client over one
shared keep-alive connector and uvloop. The orchestrator writes a job (one JSON line)
to stdin; the client prepares (connects, hashes the data it will push), prints
``ready``, waits for ``go`` on stdin, runs the job, and prints one JSON line with the
result. Start and end are CLOCK_MONOTONIC times, comparable across processes.

Uploads stream from the data file in 1 MiB reads; nothing larger than a chunk is held
in memory. Each pushed blob is a region of the data file whose first 32 bytes are
replaced by a per-run nonce, so every push writes new content under a new digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, BinaryIO, cast

import aiohttp
from yarl import URL

CHUNK = 1 << 20
NONCE_BYTES = 32
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)

Job = dict[str, Any]
Result = dict[str, Any]


class BenchError(Exception):
    """A server answered something other than what the protocol promises."""


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


async def _expect(resp: aiohttp.ClientResponse, status: int, what: str) -> None:
    if resp.status != status:
        body = (await resp.read())[:300]
        raise BenchError(f"{what}: HTTP {resp.status} (wanted {status}): {body!r}")


async def _run_concurrently(
    count: int,
    concurrency: int,
    one: Callable[[int], Awaitable[None]],
    deadline: float | None = None,
) -> int:
    """Call ``one(i)`` for i in range(count), ``concurrency`` at a time.

    With a ``deadline`` (monotonic time) no new call starts after it; returns how many ran.
    """
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and (deadline is None or time.monotonic() < deadline):
            i = next_index
            next_index += 1
            await one(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return next_index


# -- blob data ---------------------------------------------------------------------------


def _read_region(f: BinaryIO, offset: int, size: int, nonce: bytes) -> Iterator[bytes]:
    """Yield the region's bytes in CHUNK reads with the nonce over its first bytes."""
    f.seek(offset)
    pos = 0
    while pos < size:
        chunk = f.read(min(CHUNK, size - pos))
        if not chunk:
            raise BenchError(f"data file ends before {offset + size}")
        if pos == 0:
            chunk = nonce + chunk[len(nonce) :]
        pos += len(chunk)
        yield chunk


def region_digest(path: str, offset: int, size: int, nonce: bytes) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in _read_region(f, offset, size, nonce):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


async def _body(path: str, offset: int, size: int, nonce: bytes) -> AsyncIterator[bytes]:
    # Page-cache reads of 1 MiB take well under a millisecond; no thread hop needed.
    with open(path, "rb") as f:  # noqa: ASYNC230
        for chunk in _read_region(f, offset, size, nonce):
            yield chunk


def _location(base: URL, resp: aiohttp.ClientResponse) -> URL:
    location = resp.headers.get("Location")
    if not location:
        raise BenchError(f"upload start: no Location header (HTTP {resp.status})")
    return base.join(URL(location))


async def upload(
    session: aiohttp.ClientSession, base: URL, repo: str, digest: str, body: Any, size: int
) -> None:
    """Monolithic push: POST to open a session, then PUT the whole blob with ?digest=."""
    async with session.post(base / "v2" / repo / "blobs/uploads/") as resp:
        await _expect(resp, 202, "upload start")
        location = _location(base, resp)
    url = location.update_query({"digest": digest})
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    async with session.put(url, data=body, headers=headers) as resp:
        await _expect(resp, 201, "upload PUT")


async def push_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    base = URL(job["base"])
    nonce = bytes.fromhex(job["nonce"])
    path: str = job["data"]
    blobs: list[tuple[int, int]] = [(int(o), int(s)) for o, s in job["blobs"]]
    digests = [region_digest(path, o, s, nonce) for o, s in blobs]
    async with _session(job["concurrency"]) as session:
        await ready()
        start = time.monotonic()

        async def one(i: int) -> None:
            offset, size = blobs[i]
            body = _body(path, offset, size, nonce)
            await upload(session, base, job["repo"], digests[i], body, size)

        await _run_concurrently(len(blobs), job["concurrency"], one)
        end = time.monotonic()
    total = sum(s for _, s in blobs)
    return {"start": start, "end": end, "bytes": total, "digests": digests}


async def _file_body(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:  # noqa: ASYNC230 - page-cache reads, as _body
        while chunk := f.read(CHUNK):
            yield chunk


async def push_files_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    """Monolithic pushes of whole files whose digests are known (bench/clients.py)."""
    base = URL(job["base"])
    files: list[tuple[str, str, int]] = [(p, d, int(s)) for p, d, s in job["files"]]
    async with _session(job["concurrency"]) as session:
        await ready()
        start = time.monotonic()

        async def one(i: int) -> None:
            path, digest, size = files[i]
            await upload(session, base, job["repo"], digest, _file_body(path), size)

        await _run_concurrently(len(files), job["concurrency"], one)
        end = time.monotonic()
    return {"start": start, "end": end, "bytes": sum(s for _, _, s in files)}


async def put_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    """Plain PUTs of data file regions to URLs (an object store's pre-signed URLs): the
    store's own write speed, for the rows a registry on that store is compared with."""
    nonce = bytes.fromhex(job["nonce"])
    path: str = job["data"]
    targets: list[tuple[str, int, int]] = [(u, int(o), int(s)) for u, o, s in job["puts"]]
    async with _session(job["concurrency"]) as session:
        await ready()
        start = time.monotonic()

        async def one(i: int) -> None:
            url, offset, size = targets[i]
            body = _body(path, offset, size, nonce)
            headers = {"Content-Length": str(size)}
            # encoded=True: the signature covers the query exactly as the store wrote it.
            async with session.put(URL(url, encoded=True), data=body, headers=headers) as resp:
                await _expect(resp, 200, f"PUT {url}")

        await _run_concurrently(len(targets), job["concurrency"], one)
        end = time.monotonic()
    return {"start": start, "end": end, "bytes": sum(s for _, _, s in targets)}


class _Counter(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection that receives bodies into a reused buffer.

    aiohttp's client tops out near 700 MB/s on this machine, copying every chunk into
    its stream reader; for the pull rows that would measure the client. This protocol
    lets the kernel copy into one 1 MiB buffer and only counts the bytes.
    """

    def __init__(self) -> None:
        self._view = memoryview(bytearray(CHUNK))
        self._head = bytearray()
        self._remaining = -1  # body bytes still expected; -1 while reading headers
        self._status = 0
        self._length = 0
        self._waiter: asyncio.Future[tuple[int, int]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def buffer_updated(self, nbytes: int) -> None:
        if self._remaining < 0:
            self._head += self._view[:nbytes]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
            self._status = int(lines[0].split()[1])
            fields = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            if "content-length" not in fields:
                self._fail(BenchError(f"response without Content-Length: {lines[:6]}"))
                return
            self._length = int(fields["content-length"])
            self._remaining = self._length - (len(self._head) - end - 4)
            self._head.clear()
        else:
            self._remaining -= nbytes
        if self._remaining == 0:
            self._remaining = -1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((self._status, self._length))
        elif self._remaining < -1:
            self._fail(BenchError("more bytes than Content-Length"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(BenchError(f"connection lost: {exc!r}"))

    async def get(self, target: str, host: str) -> tuple[int, int]:
        """(status, body length) of ``GET target``."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return await self._waiter


async def pull_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    targets: list[tuple[str, int]] = [(u, int(s)) for u, s in job["urls"]]
    if job.get("client", "raw") == "raw":
        return await _pull_raw(targets, job["concurrency"], ready)
    async with _session(job["concurrency"]) as session:
        await ready()
        start = time.monotonic()

        async def one(i: int) -> None:
            url, size = targets[i]
            async with session.get(url) as resp:
                await _expect(resp, 200, f"GET {url}")
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
            if received != size:
                raise BenchError(f"GET {url}: {received} bytes, wanted {size}")

        await _run_concurrently(len(targets), job["concurrency"], one)
        end = time.monotonic()
    return {"start": start, "end": end, "bytes": sum(s for _, s in targets)}


async def _pull_raw(
    targets: list[tuple[str, int]], concurrency: int, ready: Callable[[], Awaitable[None]]
) -> Result:
    loop = asyncio.get_running_loop()
    first = URL(targets[0][0])
    assert first.host is not None and first.port is not None
    host, port = first.host, first.port
    conns: list[_Counter] = []
    for _ in range(min(concurrency, len(targets))):
        _, protocol = await loop.create_connection(_Counter, host, port)
        conns.append(protocol)
    await ready()
    start = time.monotonic()
    next_index = 0

    async def worker(conn: _Counter) -> None:
        nonlocal next_index
        while next_index < len(targets):
            url, size = targets[next_index]
            next_index += 1
            parsed = URL(url)
            status, length = await conn.get(parsed.raw_path_qs, f"{host}:{port}")
            if status != 200 or length != size:
                raise BenchError(f"GET {url}: HTTP {status}, {length} bytes, wanted {size}")

    await asyncio.gather(*(worker(c) for c in conns))
    end = time.monotonic()
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {"start": start, "end": end, "bytes": sum(s for _, s in targets)}


async def requests_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    """Up to ``count`` requests (for at most ``seconds``) cycling over ``requests``.

    Latencies are in microseconds.
    """
    specs = [
        (str(r["method"]), URL(r["url"], encoded=True), dict(r.get("headers", {})))
        for r in job["requests"]
    ]
    count: int = job["count"]
    expect: int = job.get("expect", 200)
    min_bytes: int = job.get("min_bytes", 0)
    latencies: list[int] = [0] * count
    async with _session(job["concurrency"]) as session:
        # Open the connections before the clock starts.
        async def warm(i: int) -> None:
            method, url, headers = specs[i % len(specs)]
            async with session.request(method, url, headers=headers) as resp:
                await _expect(resp, expect, f"{method} {url}")
                await resp.read()

        await _run_concurrently(job["concurrency"], job["concurrency"], warm)
        await ready()
        start = time.monotonic()

        async def one(i: int) -> None:
            method, url, headers = specs[i % len(specs)]
            t0 = time.perf_counter_ns()
            async with session.request(method, url, headers=headers) as resp:
                body = await resp.read()
                if resp.status != expect or len(body) < min_bytes:
                    raise BenchError(
                        f"{method} {url}: HTTP {resp.status}, {len(body)} bytes: {body[:200]!r}"
                    )
            latencies[i] = (time.perf_counter_ns() - t0) // 1000

        seconds = job.get("seconds")
        deadline = None if seconds is None else start + float(seconds)
        done = await _run_concurrently(count, job["concurrency"], one, deadline)
        end = time.monotonic()
    return {"start": start, "end": end, "count": done, "latencies_us": latencies[:done]}


# -- metadata population -----------------------------------------------------------------


def small_image(seed: str) -> tuple[bytes, bytes, bytes]:
    """A config blob, a layer blob and an OCI manifest referencing both."""
    layer = hashlib.sha256(seed.encode()).digest() * 32  # 1 KiB
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    return config, layer, manifest


def _blob_refs(manifest: bytes) -> list[str]:
    parsed = json.loads(manifest)
    return [parsed["config"]["digest"]] + [layer["digest"] for layer in parsed["layers"]]


async def put_manifest(
    session: aiohttp.ClientSession, base: URL, repo: str, reference: str, manifest: bytes
) -> None:
    url = base / "v2" / repo / "manifests" / reference
    async with session.put(url, data=manifest, headers={"Content-Type": OCI_MANIFEST}) as resp:
        await _expect(resp, 201, f"PUT manifest {repo}:{reference}")


async def populate_job(job: Job, ready: Callable[[], Awaitable[None]]) -> Result:
    """Tags: one manifest under many tags of ``repo``. Repos: mount its blobs + PUT each.

    The source repository gets the image's blobs before the clock starts.
    """
    base = URL(job["base"])
    source: str = job["source"]
    config, layer, manifest = small_image(job.get("seed", "berth-bench"))
    refs = _blob_refs(manifest)
    names: list[str] = job["names"]
    async with _session(job["concurrency"]) as session:
        for blob, digest in zip((config, layer), refs, strict=True):
            await upload(session, base, source, digest, blob, len(blob))
        await ready()
        start = time.monotonic()

        async def tag(i: int) -> None:
            await put_manifest(session, base, source, names[i], manifest)

        async def repository(i: int) -> None:
            for digest in refs:
                url = (base / "v2" / names[i] / "blobs/uploads/").with_query(
                    {"mount": digest, "from": source}
                )
                async with session.post(url) as resp:
                    await _expect(resp, 201, f"mount {digest} into {names[i]}")
            await put_manifest(session, base, names[i], "latest", manifest)

        one = tag if job["kind"] == "populate_tags" else repository
        await _run_concurrently(len(names), job["concurrency"], one)
        end = time.monotonic()
    return {"start": start, "end": end, "count": len(names)}


JOBS: dict[str, Callable[[Job, Callable[[], Awaitable[None]]], Awaitable[Result]]] = {
    "push": push_job,
    "pull": pull_job,
    "put": put_job,
    "push_files": push_files_job,
    "requests": requests_job,
    "populate_tags": populate_job,
    "populate_repos": populate_job,
}


async def _main() -> Result:
    loop = asyncio.get_running_loop()
    job: Job = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    cpu_at_go = 0.0

    async def ready() -> None:
        nonlocal cpu_at_go
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise BenchError(f"expected 'go' on stdin, got {line!r}")
        cpu_at_go = time.process_time()

    result = await JOBS[job["kind"]](job, ready)
    # The client's own CPU while measuring: near its wall time means it was the limit.
    result["cpu_s"] = time.process_time() - cpu_at_go
    return result


def main() -> int:
    try:
        import uvloop

        run: Callable[[Any], Result] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        run = asyncio.run
    try:
        result = run(_main())
    except Exception as exc:  # reported to the orchestrator, which fails the run
        result = {"error": f"{type(exc).__name__}: {exc!r}"}
    _write_all(sys.stdout.fileno(), (json.dumps(result) + "\n").encode())
    return 1 if "error" in result else 0


def _write_all(fd: int, data: bytes) -> None:
    """Results can be large (every latency): written whole even if the pipe was left
    non-blocking (a run cut them at the pipe's 64 KiB once, with set_blocking before a
    plain write)."""
    sys.stdout.flush()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


if __name__ == "__main__":
    sys.exit(main())
