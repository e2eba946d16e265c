"""The pull-through cache against real upstreams: CNCF distribution 2.8, a second Berth
with token auth, and small fake upstreams (429 answers, wrong bytes) run in the test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support.clients import (
    Registry,
    blob_file,
    cached_blob,
    canonical_json,
    crane,
    skopeo,
    wait_for,
)
from tests.support.containerd import Containerd
from tests.support.control_plane import CertificateAuthority
from tests.support.images import make_oci_layout, read_blob, read_json_blob
from tests.support.processes import RegistryProcess, free_port
from tests.support.s3_store import S3Store
from tests.support.tcp_forward import TcpForward
from tests.support.tls import TlsRegistryProcess, serving_pair

pytestmark = pytest.mark.integration


Start = Callable[..., RegistryProcess]


def mirror_config(url: str, **extra: Any) -> dict[str, Any]:
    upstream = {"name": "up", "url": url, "prefix": "mirror", "timeout_seconds": 2, **extra}
    return {"upstreams": [upstream], "log": {"level": "info", "format": "text"}}


def pull(host: str, ref: str, dest: Path) -> str:
    """skopeo copy from the cache into an OCI layout; returns the copied manifest digest."""
    skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{ref}", f"oci:{dest}:x")
    top = json.loads((dest / "index.json").read_text())
    digest: str = top["manifests"][0]["digest"]
    return digest


def upstream_blob_gets(dist: RegistryProcess, repo: str, digest: str) -> list[str]:
    """The GETs of a blob in distribution's access log (the fetches a cache made)."""
    log = dist.log_path.read_text(errors="replace")
    return [line for line in log.splitlines() if f'"GET /v2/{repo}/blobs/{digest}' in line]


def blob_sha256(cache: Registry, repo: str, digest: str) -> str:
    """GET a blob whole; the hex sha256 of what came."""
    response = cache.get(f"/v2/{repo}/blobs/{digest}")
    assert response.status == 200, response
    return hashlib.sha256(response.body).hexdigest()


@pytest.fixture
def upstream_image(registry_process: Start, tmp_path: Path) -> tuple[RegistryProcess, str, Path]:
    dist = registry_process("distribution")
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, layers=2, layer_size=300_000)
    skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{dist.host}/team/app:v1"
    )
    return dist, digest, layout


def test_skopeo_pulls_through_distribution_and_from_cache_when_it_is_gone(
    registry_process: Start, upstream_image: tuple[RegistryProcess, str, Path], tmp_path: Path
) -> None:
    dist, digest, layout = upstream_image
    berth = registry_process("berth", config=mirror_config(dist.url, tag_ttl_seconds=0))
    assert pull(berth.host, "mirror/team/app:v1", tmp_path / "first") == digest
    manifest = read_json_blob(layout, digest)
    for layer in manifest["layers"]:
        # Stored locally, byte for byte.
        assert cached_blob(berth.root, layer["digest"]) == read_blob(layout, layer["digest"])

    dist.kill()
    # The tag is revalidated on every pull (TTL 0): the upstream is gone, the cache answers.
    assert pull(berth.host, "mirror/team/app:v1", tmp_path / "second") == digest
    api = Registry(berth.url)
    response = api.manifest("mirror/team/app", "v1")
    assert response.status == 200
    assert (response.header("Warning") or "").startswith("110 berth ")
    assert api.manifest("mirror/team/app", digest).header("Warning") is None
    # Never fetched: the upstream's trouble is the client's error, not a 404.
    missing = api.manifest("mirror/team/other", "v1")
    assert missing.status == 502, missing


def test_mirrored_repositories_refuse_pushes(
    registry_process: Start, upstream_image: tuple[RegistryProcess, str, Path]
) -> None:
    dist, _, _ = upstream_image
    berth = registry_process("berth", config=mirror_config(dist.url))
    api = Registry(berth.url)
    response = api.request("POST", "/v2/mirror/team/app/blobs/uploads/")
    assert response.status == 403
    assert response.json()["errors"][0]["code"] == "DENIED"
    assert "pull-through cache" in response.json()["errors"][0]["message"]
    body = canonical_json({"schemaVersion": 2})
    assert api.put_manifest("mirror/team/app", "v2", body).status == 403
    # Other repositories take pushes as always.
    api.push_image("local/app", "v1", [b"layer"])


@pytest.mark.parametrize("workers", [1, 2])
def test_twenty_concurrent_pulls_of_an_uncached_blob_fetch_it_once(
    registry_process: Start, workers: int
) -> None:
    """One fetch however many clients ask, also when they land on different worker
    processes (which claim the fetch through a lock file)."""
    dist = registry_process("distribution")
    upstream = Registry(dist.url)
    data = hashlib.shake_256(b"big").digest(64 << 20)
    digest = upstream.push_blob("big/blob", data)
    config = {**mirror_config(dist.url), "http": {"workers": workers}}
    berth = registry_process("berth", config=config)
    cache = Registry(berth.url, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: blob_sha256(cache, "mirror/big/blob", digest), range(20)))
    assert results == [digest.split(":")[1]] * 20
    fetches = upstream_blob_gets(dist, "big/blob", digest)
    assert len(fetches) == 1, fetches
    assert len(cached_blob(berth.root, digest)) == len(data)


Connect = Callable[[], http.client.HTTPConnection]


def _cache_of(
    registry_process: Start, request: pytest.FixtureRequest, upstream: str, tls: bool
) -> Connect:
    """A Berth mirroring ``upstream`` (plain HTTP, or HTTPS with a test CA); how to
    open a connection to it."""
    config = mirror_config(upstream)
    if not tls:
        berth = registry_process("berth", config=config)
        return lambda: http.client.HTTPConnection(berth.host, timeout=120)
    ca: CertificateAuthority = request.getfixturevalue("ca")
    start_tls: Callable[..., TlsRegistryProcess] = request.getfixturevalue("tls_registry")
    secure = start_tls(serving_pair(ca, "server"), ca.cert_path, config=config)
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    return lambda: http.client.HTTPSConnection(secure.host, timeout=120, context=context)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_pull_that_comes_during_a_fetch_gets_its_bytes_as_the_fetch_goes(
    registry_process: Start, request: pytest.FixtureRequest, tls: bool
) -> None:
    """The second client of an uncached blob is not held until the whole blob is
    stored: it follows the file as the one fetch writes it (the upstream slowed to
    ~16 MiB/s), and both get the right bytes; over HTTPS too, where the follower's
    bytes go through the transport instead of straight onto the socket."""
    dist = registry_process("distribution")
    data = hashlib.shake_256(b"slow").digest(32 << 20)
    digest = Registry(dist.url).push_blob("slow/blob", data)
    slow = TcpForward(("127.0.0.1", dist.port), rate=16 << 20).start()
    try:
        connect = _cache_of(registry_process, request, f"http://{slow.host}", tls)
        path = f"/v2/mirror/slow/blob/blobs/{digest}"
        ended: dict[str, float] = {}

        def get(who: str) -> tuple[float, str]:
            conn = connect()
            try:
                conn.request("GET", path)
                reply = conn.getresponse()
                assert reply.status == 200, reply.status
                assert reply.getheader("Content-Length") == str(len(data))
                first = reply.read(1)
                first_at = time.monotonic()
                body = first + reply.read()
                ended[who] = time.monotonic()
                return first_at, hashlib.sha256(body).hexdigest()
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            leader = pool.submit(get, "leader")
            time.sleep(0.5)  # the fetch is under way, a fraction of the blob stored
            follower = pool.submit(get, "follower")
            follower_first, follower_sha = follower.result()
            _, leader_sha = leader.result()
        assert leader_sha == follower_sha == digest.split(":")[1]
        # Its first byte came while the fetch went on (a waiting follower gets none
        # until the leader has everything).
        assert follower_first < ended["leader"] - 0.5, (follower_first, ended)
        fetches = upstream_blob_gets(dist, "slow/blob", digest)
        assert len(fetches) == 1, fetches
    finally:
        slow.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_leading_client_that_stops_reading_holds_up_no_one(
    registry_process: Start, request: pytest.FixtureRequest, tls: bool
) -> None:
    """The client whose GET starts the fetch of an uncached blob stops reading after
    its first MiB (a node that hangs, or is gone without closing its connection): the
    fetch goes on, a second client gets the whole blob meanwhile, and the first, once
    it reads again, gets every byte in order (the rest from the stored file; over
    HTTPS through the transport)."""
    dist = registry_process("distribution")
    data = hashlib.shake_256(b"hang").digest(32 << 20)  # far more than socket buffers
    digest = Registry(dist.url).push_blob("hang/blob", data)
    connect = _cache_of(registry_process, request, dist.url, tls)
    path = f"/v2/mirror/hang/blob/blobs/{digest}"
    first_mib, go = threading.Event(), threading.Event()

    def leader() -> str:
        conn = connect()
        try:
            conn.connect()
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            conn.request("GET", path)
            reply = conn.getresponse()
            assert reply.status == 200, reply.status
            head = reply.read(1 << 20)
            first_mib.set()
            assert go.wait(60)
            return hashlib.sha256(head + reply.read()).hexdigest()
        finally:
            conn.close()

    def follower() -> str:
        conn = connect()
        conn.timeout = 20  # the fetch held by the leader would take 30 s to give up on it
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            assert reply.status == 200, reply.status
            return hashlib.sha256(reply.read()).hexdigest()
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(leader)
        assert first_mib.wait(30)
        try:
            second = follower()
        finally:
            go.set()
        assert second == first.result() == digest.split(":")[1]
    assert len(upstream_blob_gets(dist, "hang/blob", digest)) == 1


@dataclass
class FakeUpstream:
    """A registry answering from a dict, in a thread: ``status`` forces every answer
    (429, 503), ``wrong`` serves other bytes than the digest names."""

    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, body)
    blobs: dict[str, bytes] = field(default_factory=dict)
    status: int | None = None
    failed_gets: tuple[int, str] | None = None  # manifest GETs (not HEADs) answer this
    compress: bool = False  # gzip what it sends when the client accepts it (as CDNs do)
    # Blob requests are redirected to /storage/, whose URLs, like presigned ones, are
    # good for a GET only (a HEAD there is 403).
    redirect_blobs: bool = False
    requests: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ranged = " (range)" if "Range" in request.headers else ""
        self.requests.append(f"{request.method} {request.path}{ranged}")
        if self.status is not None:
            return web.Response(status=self.status, headers={"Retry-After": "60"})
        if request.path == "/v2/":
            return web.json_response({})
        if request.path.startswith("/storage/"):
            ref = request.path.removeprefix("/storage/")
            if request.method != "GET" or ref not in self.blobs:
                return web.Response(status=403)
            return web.Response(body=self.blobs[ref])
        _, _, rest = request.path.partition("/v2/")
        _name, kind, ref = rest.rsplit("/", 2)
        if kind == "manifests" and request.method == "GET" and self.failed_gets is not None:
            status, text = self.failed_gets
            return web.Response(status=status, text=text, content_type="text/html")
        if kind == "manifests" and ref in self.manifests:
            media_type, body = self.manifests[ref]
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
            body = None if request.method == "HEAD" else body
            return self._maybe_compressed(web.Response(body=body, headers=headers))
        if kind == "blobs" and ref in self.blobs and self.redirect_blobs:
            return web.Response(status=307, headers={"Location": f"/storage/{ref}"})
        if kind == "blobs" and ref in self.blobs:
            return self._maybe_compressed(web.Response(body=self.blobs[ref]))
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)

    def _maybe_compressed(self, response: web.Response) -> web.Response:
        if self.compress:
            response.enable_compression()  # only if the request accepts an encoding
        return response

    def serve(self) -> Iterator[FakeUpstream]:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.run_until_complete(runner.cleanup())
            loop.close()


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    yield from FakeUpstream().serve()


def _serve_layout(upstream: FakeUpstream, layout: Path, digest: str) -> None:
    """Everything in an OCI layout, served by the fake; the manifest also as v1."""
    for path in (layout / "blobs" / "sha256").iterdir():
        upstream.blobs[f"sha256:{path.name}"] = path.read_bytes()
    manifest = upstream.blobs[digest]
    media_type = json.loads(manifest)["mediaType"]
    upstream.manifests["v1"] = upstream.manifests[digest] = (media_type, manifest)


def test_rate_limited_upstream_gets_the_cached_copy_served(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    digest = make_oci_layout(tmp_path / "img", layers=1, layer_size=5000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    berth = registry_process("berth", config=mirror_config(fake_upstream.url, tag_ttl_seconds=0))
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    fake_upstream.status = 429
    assert pull(berth.host, "mirror/app:v1", tmp_path / "second") == digest
    response = Registry(berth.url).manifest("mirror/app", "v1")
    assert response.status == 200
    assert "429" in (response.header("Warning") or ""), response.header("Warning")
    # Nothing cached for this one: the client is told the upstream's limit.
    assert Registry(berth.url).manifest("mirror/other", "v1").status == 429


def test_a_failed_get_of_a_moved_tag_serves_the_cached_copy_whatever_the_error_page(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The tag moved (its HEAD says so), the GET of the new manifest fails with an error
    page: the cached copy is served, its Warning quoting the reply without its line
    breaks (a header holding them could not be sent: a 500 before)."""
    digest = make_oci_layout(tmp_path / "img", layers=1, layer_size=5000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    berth = registry_process("berth", config=mirror_config(fake_upstream.url, tag_ttl_seconds=0))
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    moved = make_oci_layout(tmp_path / "moved", layers=1, layer_size=6000, seed="moved")
    body = (tmp_path / "moved" / "blobs" / "sha256" / moved[7:]).read_bytes()
    fake_upstream.manifests["v1"] = (json.loads(body)["mediaType"], body)
    fake_upstream.failed_gets = (503, '<html>\r\n<body>"busy"\t\\ \u00e9</body>\r\n</html>\r\n')
    response = Registry(berth.url).manifest("mirror/app", "v1")
    assert response.status == 200, response.status
    assert response.header("Docker-Content-Digest") == digest
    warning = response.header("Warning") or ""
    assert warning.startswith('110 berth "') and "503" in warning and "busy" in warning
    assert all(" " <= c <= "~" for c in warning) and warning.count('"') == 2, warning


def test_an_upstream_that_compresses_what_a_client_accepts_is_asked_for_the_bytes(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A CDN in front of an upstream gzips replies when the request accepts it: the cache
    accepts the identity only, so it stores the manifest and the layers as their digests
    name them (it got gzip it did not unpack before: a digest mismatch)."""
    digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=50_000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    fake_upstream.compress = True
    berth = registry_process("berth", config=mirror_config(fake_upstream.url))
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest


def test_a_manifest_over_the_limit_is_refused_and_a_tag_moved_to_one_keeps_its_copy(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A manifest larger than limits.max_manifest_bytes: refused as such when nothing is
    cached (it was a 502 'upstream unavailable'); a cached tag the upstream moved to one
    keeps being served, with a Warning, and the upstream is asked again after the TTL,
    not at every pull (it was a GET per pull, each failing)."""
    digest = make_oci_layout(tmp_path / "img", layers=1, layer_size=5000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    config = mirror_config(fake_upstream.url, tag_ttl_seconds=1)
    berth = registry_process("berth", config={**config, "limits": {"max_manifest_bytes": 4096}})
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    media_type, small = fake_upstream.manifests["v1"]
    big = json.dumps({**json.loads(small), "annotations": {"pad": "x" * 5000}}).encode()
    fake_upstream.manifests["v1"] = fake_upstream.manifests["big"] = (media_type, big)
    api = Registry(berth.url)

    refused = api.manifest("mirror/app", "big")
    assert refused.status == 413 and b"SIZE_INVALID" in refused.body, refused

    time.sleep(1.1)  # the cached tag is due for its HEAD
    response = api.manifest("mirror/app", "v1")
    assert response.status == 200 and response.header("Docker-Content-Digest") == digest
    assert "refused" in (response.header("Warning") or ""), response.header("Warning")
    asked = len(fake_upstream.requests)
    for _ in range(3):
        assert api.manifest("mirror/app", "v1").header("Docker-Content-Digest") == digest
    assert len(fake_upstream.requests) == asked, fake_upstream.requests[asked:]


def test_a_blob_the_upstream_redirects_is_fetched_and_linked_for_another_repository(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """An upstream that redirects blob requests to URLs signed for GET (S3, GCS): the
    fetch follows the redirect; the HEAD that asks whether another repository serves a
    blob stored for one is not followed into a 403 (it was a 502 for that repository's
    clients): one byte is asked for at its Location instead."""
    digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=20_000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    fake_upstream.redirect_blobs = True
    berth = registry_process("berth", config=mirror_config(fake_upstream.url))
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest

    def at_storage(ranged: bool) -> list[str]:
        got = [r for r in fake_upstream.requests if r.startswith("GET /storage/")]
        return [r for r in got if r.endswith(" (range)") == ranged]

    assert len(at_storage(False)) == 3  # the config and two layers, through the redirect
    assert pull(berth.host, "mirror/other:v1", tmp_path / "second") == digest
    assert len(at_storage(False)) == 3  # linked, not fetched again
    assert len(at_storage(True)) == 3  # each asked for a byte where the redirect led


def test_corrupt_upstream_stores_nothing_and_the_client_gets_an_error(
    registry_process: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    digest = make_oci_layout(tmp_path / "img", layers=1, layer_size=100_000)
    _serve_layout(fake_upstream, tmp_path / "img", digest)
    layer_digest = json.loads(fake_upstream.blobs[digest])["layers"][0]["digest"]
    layer = fake_upstream.blobs[layer_digest]
    fake_upstream.blobs[layer_digest] = bytes(reversed(layer))  # same size, other bytes
    berth = registry_process("berth", config=mirror_config(fake_upstream.url))
    api = Registry(berth.url)
    assert api.manifest("mirror/app", "v1").status == 200
    # HEAD waits for the fetch, which fails verification: an error, not the blob.
    assert api.head(f"/v2/mirror/app/blobs/{layer_digest}").status == 502
    # A GET that streams gets a cut body (its client sees an incomplete read).
    with pytest.raises(http.client.IncompleteRead):
        api.get(f"/v2/mirror/app/blobs/{layer_digest}")
    assert not blob_file(berth.root, layer_digest).exists()
    uploads = berth.root / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_a_cache_on_object_storage_fills_once_and_serves_every_client(
    registry_process: Start, s3_store: S3Store
) -> None:
    """On S3 (SeaweedFS) the fill writes where the blob will be, and a client that
    comes during the fetch waits for it to be stored (nothing to follow): both get the
    right bytes, from one upstream fetch; the cache then serves it without the upstream."""
    dist = registry_process("distribution")
    data = hashlib.shake_256(b"on s3").digest(24 << 20)
    digest = Registry(dist.url).push_blob("s3/blob", data)
    slow = TcpForward(("127.0.0.1", dist.port), rate=16 << 20).start()
    try:
        config = mirror_config(f"http://{slow.host}")
        config["storage"] = s3_store.server_config(s3_store.new_prefix())
        berth = registry_process("berth", config=config)
        cache = Registry(berth.url, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            leader = pool.submit(blob_sha256, cache, "mirror/s3/blob", digest)
            time.sleep(0.3)
            follower = pool.submit(blob_sha256, cache, "mirror/s3/blob", digest)
            results = [leader.result(), follower.result()]
        assert results == [digest.split(":")[1]] * 2
        fetches = upstream_blob_gets(dist, "s3/blob", digest)
        assert len(fetches) == 1, fetches
    finally:
        slow.stop()
    # The upstream gone: served from the object store.
    assert blob_sha256(cache, "mirror/s3/blob", digest) == digest.split(":")[1]


def test_replicas_over_one_database_fetch_a_blob_once(
    registry_process: Start, s3_store: S3Store, postgres_dsn: str
) -> None:
    """Two replicas (one bucket, one PostgreSQL) asked for the same uncached blob at once:
    one fetches it, the other waits for its claim and serves what it stored."""
    dist = registry_process("distribution")
    data = hashlib.shake_256(b"replicas").digest(24 << 20)
    digest = Registry(dist.url).push_blob("rep/blob", data)
    slow = TcpForward(("127.0.0.1", dist.port), rate=16 << 20).start()
    try:
        config = mirror_config(f"http://{slow.host}")
        config["storage"] = s3_store.server_config(s3_store.new_prefix())
        config["metadata"] = {"driver": "postgresql", "postgresql": {"dsn": postgres_dsn}}
        replicas = [registry_process("berth", config=config) for _ in range(2)]
        caches = [Registry(r.url, timeout=120) for r in replicas]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(lambda i: blob_sha256(caches[i % 2], "mirror/rep/blob", digest), range(4))
            )
        assert results == [digest.split(":")[1]] * 4
        fetches = upstream_blob_gets(dist, "rep/blob", digest)
        assert len(fetches) == 1, fetches
    finally:
        slow.stop()


def test_replicas_over_one_database_get_a_new_tag_once(
    registry_process: Start, s3_store: S3Store, postgres_dsn: str
) -> None:
    """Two replicas asked for the same uncached tag at once (the upstream slowed so that
    the asks overlap): one GETs the manifest, the one GET that rate limits count; the
    other uses what it stored."""
    dist = registry_process("distribution")
    digest, _ = Registry(dist.url).push_image("rep/app", "v1", [b"layer"])
    slow = TcpForward(("127.0.0.1", dist.port), rate=4096).start()
    try:
        config = mirror_config(f"http://{slow.host}", timeout_seconds=10)
        config["storage"] = s3_store.server_config(s3_store.new_prefix())
        config["metadata"] = {"driver": "postgresql", "postgresql": {"dsn": postgres_dsn}}
        replicas = [registry_process("berth", config=config) for _ in range(2)]
        caches = [Registry(r.url, timeout=60) for r in replicas]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: caches[i % 2].manifest("mirror/rep/app", "v1"), range(4)))
        assert [r.header("Docker-Content-Digest") for r in got] == [digest] * 4, got
        log = dist.log_path.read_text(errors="replace")
        gets = [line for line in log.splitlines() if '"GET /v2/rep/app/manifests/v1' in line]
        assert len(gets) == 1, gets
    finally:
        slow.stop()


def test_a_corrupt_blob_followed_during_its_fetch_is_cut_short_for_every_client(
    registry_process: Start, fake_upstream: FakeUpstream
) -> None:
    """A client following a fetch (it came while the blob arrived) gets no more than the
    leader: when the bytes do not match the digest, both bodies are cut short and
    nothing is stored."""
    data = hashlib.shake_256(b"corrupt").digest(8 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fake_upstream.blobs[digest] = bytes(reversed(data))  # same size, other bytes
    slow = TcpForward(("127.0.0.1", fake_upstream.port), rate=8 << 20).start()
    try:
        berth = registry_process("berth", config=mirror_config(f"http://{slow.host}"))
        cache = Registry(berth.url, timeout=60)

        def get(_: int) -> str:
            try:
                cache.get(f"/v2/mirror/app/blobs/{digest}")
            except http.client.IncompleteRead as exc:
                return f"cut after {len(exc.partial)} bytes"
            return "whole"

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            leader = pool.submit(get, 0)
            time.sleep(0.3)
            follower = pool.submit(get, 1)
            outcomes = [leader.result(), follower.result()]
        assert all(o.startswith("cut after") for o in outcomes), outcomes
        assert fake_upstream.requests.count(f"GET /v2/app/blobs/{digest}") == 1
        assert not blob_file(berth.root, digest).exists()
    finally:
        slow.stop()


def test_crane_pulls_through_a_berth_upstream_with_token_auth(
    registry_process: Start, tmp_path: Path
) -> None:
    from tests.integration.test_auth_clients import SECRETS, creds, start_auth_registry

    upstream = start_auth_registry(registry_process, tmp_path)
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, layers=1, layer_size=50_000)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds("ci"),
        f"oci:{layout}:v1",
        f"docker://{upstream.host}/team-a/api:v1",
    )
    secret = tmp_path / "upstream-secret"
    secret.write_text(SECRETS["ci"])
    berth = registry_process(
        "berth",
        config=mirror_config(upstream.process.url, username="ci", password_file=str(secret)),
    )
    out = crane("digest", "--insecure", f"{berth.host}/mirror/team-a/api:v1").stdout.strip()
    assert out == digest
    crane(
        "pull",
        "--insecure",
        "--format",
        "oci",
        f"{berth.host}/mirror/team-a/api:v1",
        tmp_path / "o",
    )
    assert upstream.tokens_issued() >= 1


_HOSTS_TOML = """\
server = "{server}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
"""


def test_ctr_pulls_through_berth_named_as_mirror_in_hosts_toml(
    registry_process: Start,
    upstream_image: tuple[RegistryProcess, str, Path],
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    dist, digest, _ = upstream_image
    # Berth mirrors the upstream host (containerd names it in ?ns=) under "mirror".
    berth = registry_process("berth", config=mirror_config(dist.url, hosts=[dist.host]))
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / dist.host).mkdir(parents=True)
    (hosts_dir / dist.host / "hosts.toml").write_text(
        _HOSTS_TOML.format(server=dist.url, mirror=berth.url)
    )
    ref = f"{dist.host}/team/app:v1"

    def ctr(*args: str | Path) -> str:
        return containerd.ctr(*(str(arg) for arg in args))

    ctr("images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", "native", ref)
    # It came through the mirror: Berth holds the tag, under the prefix.
    assert Registry(berth.url).tags("mirror/team/app") == ["v1"]
    ctr("images", "rm", "--sync", ref)
    dist.kill()
    ctr("images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", "native", ref)
    listed = [line.split() for line in ctr("images", "ls").splitlines()[1:] if line.strip()]
    assert [(row[0], row[2]) for row in listed] == [(ref, digest)]


def test_eviction_removes_what_is_not_pulled_and_gc_frees_it(
    registry_process: Start, upstream_image: tuple[RegistryProcess, str, Path], tmp_path: Path
) -> None:
    dist, digest, layout = upstream_image
    idle_days = 3 / 86400  # three seconds
    config = mirror_config(dist.url, max_idle_days=idle_days)
    config["gc"] = {"interval_seconds": 1, "grace_seconds": 0}
    berth = registry_process("berth", config=config)
    assert pull(berth.host, "mirror/team/app:v1", tmp_path / "first") == digest
    layers = [layer["digest"] for layer in read_json_blob(layout, digest)["layers"]]
    assert all(blob_file(berth.root, d).exists() for d in layers)
    api = Registry(berth.url)
    wait_for(lambda: api.tags("mirror/team/app") == [], timeout=30)
    wait_for(lambda: not any(blob_file(berth.root, d).exists() for d in layers), timeout=30)
    # Pulled again: fetched again.
    assert pull(berth.host, "mirror/team/app:v1", tmp_path / "again") == digest


def test_cache_fills_stay_in_their_region(
    registry_process: Start, upstream_image: tuple[RegistryProcess, str, Path], tmp_path: Path
) -> None:
    """Two regions replicating to each other, both mirroring one upstream: a pull through
    one fills its cache only (the other fills its own from the upstream; a replicated
    fill would be a push into its read-only mirror), while pushes still replicate."""
    dist, digest, layout = upstream_image
    ports = {name: free_port() for name in ("eu", "us")}

    def config(region: str, other: str) -> dict[str, Any]:
        return {
            **mirror_config(dist.url),
            "replication": {
                "region": region,
                "anti_entropy_interval_seconds": 1,
                "retry_max_seconds": 1,
                "peers": [{"name": other, "url": f"http://127.0.0.1:{ports[other]}"}],
            },
        }

    eu = registry_process("berth", port=ports["eu"], config=config("eu", "us"))
    us = registry_process("berth", port=ports["us"], config=config("us", "eu"))
    assert pull(eu.host, "mirror/team/app:v1", tmp_path / "eu") == digest
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{eu.host}/own/app:v1")
    # The push reaches the other region; by then the fill, logged first, was passed over.
    wait_for(lambda: Registry(us.url).tags("own/app") == ["v1"], timeout=30)
    time.sleep(2)  # and an anti-entropy round (every second) has run too
    assert Registry(us.url).tags("mirror/team/app") is None
    peers = Registry(eu.url).get("/berth/v1/replication/status").json()["peers"]
    assert [(p["name"], p["last_error"], p["queue_depth"]) for p in peers] == [("us", None, 0)]
