"""The pull-through cache against upstreams that misbehave or need more than plain HTTP: 5xx
answers, an upstream that never answers, Basic auth (CNCF distribution 2.8 with htpasswd),
TLS with a private CA, the berth_cache_* metrics, and the policy on mirrored repositories.

Helpers come from test_pull_through.py (the fake upstream, skopeo pulls, the mirror config)
and test_auth_clients.py (a Berth with htpasswd, a policy file and tokens)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web

from tests.integration.test_auth_clients import (
    HASHES,
    basic,
    crane_as,
    start_auth_registry,
)
from tests.integration.test_pull_through import (
    FakeUpstream,
    _serve_layout,
    mirror_config,
    pull,
)
from tests.support.clients import (
    MANIFEST_ACCEPT,
    Registry,
    assert_error,
    blob_files,
    cached_blob,
    skopeo,
)
from tests.support.control_plane import CertificateAuthority
from tests.support.images import make_oci_layout, read_blob, read_json_blob
from tests.support.processes import RegistryProcess
from tests.support.tls import TlsRegistryProcess, cert_dir, serving_pair

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


@dataclass
class HangingUpstream(FakeUpstream):
    """The fake upstream, plus ``hang``: requests are read, and never answered while set."""

    hang: bool = False
    hung: int = 0  # requests that were left hanging
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.hang:
            self.hung += 1
            self._loop = asyncio.get_running_loop()
            await self._released.wait()
        return await super().handle(request)

    def release(self) -> None:
        """Answer the hanging requests (from the test's thread)."""
        self.hang = False
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._released.set)


@pytest.fixture
def upstream() -> Iterator[HangingUpstream]:
    """A fake upstream (answers, 503s or hangs on demand), served in a thread."""
    fake = HangingUpstream()
    serving = fake.serve()
    next(serving)
    yield fake
    fake.release()  # let the hanging handlers end before the server shuts down
    next(serving, None)


def _image(upstream: FakeUpstream, directory: Path, layers: int = 1) -> tuple[str, dict[str, Any]]:
    """An image served by the fake as app:v1 (any repository name); (digest, manifest)."""
    digest = make_oci_layout(directory, layers=layers, layer_size=20_000)
    _serve_layout(upstream, directory, digest)
    return digest, read_json_blob(directory, digest)


def _upstream_entry(name: str, url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "prefix": prefix, "timeout_seconds": 2, **extra}


def _mirrors(*upstreams: dict[str, Any]) -> dict[str, Any]:
    return {"upstreams": list(upstreams), "log": {"level": "info", "format": "text"}}


_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (0 when the series does not exist yet)."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name and dict(_LABEL.findall(m["labels"] or "")) == labels:
            return float(m["value"])
    return 0.0


def _metrics(api: Registry) -> str:
    response = api.get("/metrics")
    assert response.status == 200, response
    return response.body.decode()


def _stored_nothing(root: Path) -> None:
    assert blob_files(root) == [], blob_files(root)
    uploads = root / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


# --- upstream failures -----------------------------------------------------------------


def test_5xx_upstream_gets_the_cached_manifest_and_blobs_served(
    registry_process: Start, upstream: HangingUpstream, tmp_path: Path
) -> None:
    """An upstream answering 503 after a pull: cached manifest (200, Warning), cached blobs."""
    digest, manifest = _image(upstream, tmp_path / "img")
    layer = manifest["layers"][0]["digest"]
    berth = registry_process("berth", config=mirror_config(upstream.url, tag_ttl_seconds=0))
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    upstream.status = 503
    asked_before = len(upstream.requests)
    api = Registry(berth.url)

    response = api.manifest("mirror/app", "v1")
    assert response.status == 200, response
    assert response.header("Docker-Content-Digest") == digest
    assert response.body == upstream.blobs[digest]
    warning = response.header("Warning") or ""
    assert warning.startswith('110 berth "cached content served'), warning
    assert "503" in warning, warning
    # TTL 0: the tag was revalidated (the upstream was asked, and said 503).
    asked = upstream.requests[asked_before:]
    assert asked and all("/manifests/" in r for r in asked), asked

    blob = api.get(f"/v2/mirror/app/blobs/{layer}")
    assert blob.status == 200, blob
    assert blob.body == upstream.blobs[layer]
    # The whole image again with a real client, blobs from the cache only.
    assert pull(berth.host, "mirror/app:v1", tmp_path / "second") == digest
    assert not any("/blobs/" in r for r in upstream.requests[asked_before:])
    # Nothing cached for another repository: the upstream's trouble is the client's error.
    assert_error(api.manifest("mirror/other", "v1"), 502, "UNKNOWN")


def test_hanging_upstream_is_given_up_on_within_its_timeout(
    registry_process: Start, upstream: HangingUpstream, tmp_path: Path
) -> None:
    """An upstream that accepts but never answers: the revalidation gives up after
    timeout_seconds and the cached copy is served with a Warning."""
    timeout = 1.0
    digest, _ = _image(upstream, tmp_path / "img")
    config = mirror_config(upstream.url, tag_ttl_seconds=0, timeout_seconds=timeout)
    berth = registry_process("berth", config=config)
    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    upstream.hang = True
    # A client patient enough to see a missing bound (aiohttp's read timeout is 60 s).
    api = Registry(berth.url, timeout=120)

    started = time.monotonic()
    response = api.manifest("mirror/app", "v1")
    elapsed = time.monotonic() - started
    assert response.status == 200, response
    assert response.header("Docker-Content-Digest") == digest
    warning = response.header("Warning") or ""
    assert "no answer within" in warning, warning
    assert upstream.hung >= 1  # the upstream was reached, and held the request
    assert timeout * 0.9 <= elapsed < timeout + 10, elapsed

    # A whole pull (manifest revalidated again, blobs cached) is bounded the same way.
    started = time.monotonic()
    assert pull(berth.host, "mirror/app:v1", tmp_path / "second") == digest
    assert time.monotonic() - started < 30
    errors = _sample(
        _metrics(api), "berth_cache_upstream_errors_total", upstream="up", reason="timeout"
    )
    assert errors >= 2, errors


# --- auth and TLS towards the upstream ---------------------------------------------------


def _refused_by_the_cache(host: str, ref: str, dest: Path) -> None:
    """skopeo pulling ``ref`` through the cache fails with the cache's 502 (not a hang)."""
    result = skopeo(
        "copy", "--src-tls-verify=false", f"docker://{host}/{ref}", f"oci:{dest}:x", check=False
    )
    assert result.returncode != 0, result.stdout
    assert "502" in result.stderr, result.stderr


def test_basic_auth_upstream_distribution_with_htpasswd(
    registry_process: Start, tmp_path: Path
) -> None:
    """distribution 2.8 with htpasswd: the right password pulls through; a wrong one is a
    prompt 502 naming the upstream's 401, and nothing is stored."""
    password = "mirror-bot-password"
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(6)).decode()
    htpasswd.write_text(f"mirror-bot:{hashed}\n")
    dist = registry_process(
        "distribution", config={"auth": {"htpasswd": {"realm": "up", "path": str(htpasswd)}}}
    )
    # The upstream really requires the credentials.
    assert Registry(dist.url).get("/v2/team/app/manifests/v1").status == 401
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, layers=2, layer_size=50_000)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"mirror-bot:{password}",
        f"oci:{layout}:v1",
        f"docker://{dist.host}/team/app:v1",
    )
    # One Berth, two upstream entries for the same registry: right and wrong password.
    berth = registry_process(
        "berth",
        config=_mirrors(
            _upstream_entry("good", dist.url, "good", username="mirror-bot", password=password),
            _upstream_entry("bad", dist.url, "bad", username="mirror-bot", password="wrong"),
        ),
    )

    # The wrong password first: a prompt refusal, and nothing stored.
    api = Registry(berth.url, timeout=60)
    started = time.monotonic()
    _refused_by_the_cache(berth.host, "bad/team/app:v1", tmp_path / "denied")
    # Raw: the spec's error shape naming the upstream's 401; a 502, not a 500.
    payload = assert_error(api.manifest("bad/team/app", "v1"), 502, "UNKNOWN")
    assert "HTTP 401" in json.dumps(payload), payload
    layers = [layer["digest"] for layer in read_json_blob(layout, digest)["layers"]]
    assert_error(api.get(f"/v2/bad/team/app/blobs/{layers[0]}"), 502, "UNKNOWN")
    assert time.monotonic() - started < 60  # a refusal, not a hang
    assert api.tags("bad/team/app") is None
    _stored_nothing(berth.root)
    metrics = _metrics(api)
    assert _sample(metrics, "berth_cache_upstream_errors_total", upstream="bad", reason="401") >= 2
    assert "Traceback" not in berth.log_tail(500)

    # The right password: the whole image, stored byte for byte.
    assert pull(berth.host, "good/team/app:v1", tmp_path / "pulled") == digest
    for layer in layers:
        assert cached_blob(berth.root, layer) == read_blob(layout, layer)


def test_tls_upstream_with_a_private_ca(
    registry_process: Start,
    ca: CertificateAuthority,
    tls_registry: Callable[..., TlsRegistryProcess],
    tmp_path: Path,
) -> None:
    """An https upstream signed by a private CA: pulls through with ca_file; without it
    (tls_verify on by default) the pull fails on verification and stores nothing."""
    secure = tls_registry(serving_pair(ca, "upstream"), ca.cert_path)
    layout = tmp_path / "img"
    digest = make_oci_layout(layout, layers=1, layer_size=50_000)
    certs = cert_dir(ca.cert_path.read_text(), tmp_path / "certs")
    skopeo(
        "copy",
        "--dest-cert-dir",
        certs,
        f"oci:{layout}:v1",
        f"docker://{secure.host}/team/app:v1",
    )
    berth = registry_process(
        "berth",
        config=_mirrors(
            _upstream_entry("trusted", secure.url, "trusted", ca_file=str(ca.cert_path)),
            _upstream_entry("untrusted", secure.url, "untrusted"),
            _upstream_entry("unverified", secure.url, "unverified", tls_verify=False),
        ),
    )

    # Without the CA first: a refusal that stores nothing.
    _refused_by_the_cache(berth.host, "untrusted/team/app:v1", tmp_path / "refused")
    api = Registry(berth.url)
    payload = assert_error(api.manifest("untrusted/team/app", "v1"), 502, "UNKNOWN")
    assert "CERTIFICATE_VERIFY_FAILED" in json.dumps(payload), payload
    layer = read_json_blob(layout, digest)["layers"][0]["digest"]
    assert_error(api.get(f"/v2/untrusted/team/app/blobs/{layer}"), 502, "UNKNOWN")
    assert api.tags("untrusted/team/app") is None
    _stored_nothing(berth.root)

    # With the CA: the same upstream, the whole image.
    assert pull(berth.host, "trusted/team/app:v1", tmp_path / "pulled") == digest
    assert cached_blob(berth.root, layer) == read_blob(layout, layer)
    # Verification off (tls_verify: false): the same upstream, no CA needed.
    assert api.manifest("unverified/team/app", "v1").header("Docker-Content-Digest") == digest
    assert "Traceback" not in berth.log_tail(500)


# --- metrics -----------------------------------------------------------------------------


def test_cache_metrics_follow_misses_hits_bytes_and_errors(
    registry_process: Start, upstream: HangingUpstream, tmp_path: Path
) -> None:
    """berth_cache_* after an uncached pull, a cached pull and a 503: misses and bytes
    match what the upstream served, hits count the cached pull, errors the 503."""
    digest, manifest = _image(upstream, tmp_path / "img", layers=2)
    blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    berth = registry_process("berth", config=mirror_config(upstream.url, tag_ttl_seconds=0))
    api = Registry(berth.url)

    def metric(name: str, **labels: str) -> float:
        return _sample(_metrics(api), name, upstream="up", **labels)

    assert pull(berth.host, "mirror/app:v1", tmp_path / "first") == digest
    blob_gets = [r for r in upstream.requests if r.startswith("GET ") and "/blobs/" in r]
    manifest_gets = [r for r in upstream.requests if r.startswith("GET ") and "/manifests/" in r]
    assert sorted(r.rsplit("/", 1)[1] for r in blob_gets) == sorted(blobs)  # each once
    served = sum(len(upstream.blobs[r.rsplit("/", 1)[1]]) for r in blob_gets)
    served += len(manifest_gets) * len(upstream.blobs[digest])
    assert metric("berth_cache_misses_total", kind="blob") == len(blobs)
    assert metric("berth_cache_misses_total", kind="manifest") >= 1
    assert metric("berth_cache_upstream_bytes_total") == served
    assert served > sum(layer["size"] for layer in manifest["layers"])

    pull(berth.host, "mirror/app:v1", tmp_path / "second")
    # Served from the cache: hits for every blob and the (revalidated) tag, nothing fetched.
    assert metric("berth_cache_hits_total", kind="blob") >= len(blobs)
    assert metric("berth_cache_hits_total", kind="manifest") >= 1
    assert metric("berth_cache_misses_total", kind="blob") == len(blobs)
    assert metric("berth_cache_upstream_bytes_total") == served
    assert metric("berth_cache_upstream_errors_total", reason="5xx") == 0

    upstream.status = 503
    assert api.manifest("mirror/app", "v1").status == 200
    assert metric("berth_cache_upstream_errors_total", reason="5xx") >= 1
    assert metric("berth_cache_stale_served_total") >= 1


# --- policy ------------------------------------------------------------------------------

OTHER_SECRET = "other-robot-secret"


def test_policy_decides_who_pulls_through_the_cache(
    registry_process: Start, upstream: HangingUpstream, tmp_path: Path
) -> None:
    """puller may pull mirror/team/*, other nothing: other is refused before anything is
    fetched from the upstream (and after it is cached); puller pulls through with crane."""
    digest, _ = _image(upstream, tmp_path / "img")
    document = {
        "version": 1,
        "robots": [
            {
                "name": "puller",
                "secret_hash": HASHES["puller"],
                "access": [{"repository": "mirror/team/*", "actions": ["pull"]}],
            },
            {
                "name": "other",
                "secret_hash": bcrypt.hashpw(OTHER_SECRET.encode(), bcrypt.gensalt(6)).decode(),
            },
        ],
    }
    ns = upstream.url.removeprefix("http://")  # containerd's ?ns=: host:port
    config = mirror_config(upstream.url)
    berth = start_auth_registry(registry_process, tmp_path, document, extra_config=config)
    ref = f"{berth.host}/mirror/team/app:v1"

    def refused_as_other(what: str) -> None:
        result = skopeo(
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            f"other:{OTHER_SECRET}",
            f"docker://{ref}",
            f"oci:{tmp_path / what}:x",
            check=False,
        )
        assert result.returncode != 0, result.stdout
        assert re.search(r"denied|unauthorized", result.stderr, re.I), result.stderr
        token = berth.token("repository:mirror/team/app:pull", basic("other", OTHER_SECRET))
        response = berth.api.get(
            "/v2/mirror/team/app/manifests/v1", {"Authorization": f"Bearer {token}"}
        )
        # A token, but without the scope: refused before the cache is consulted.
        assert_error(response, 403, "DENIED")
        # containerd's form (the upstream's name, its host in ?ns=) is the same repository.
        response = berth.api.get(
            f"/v2/team/app/manifests/v1?ns={ns}", {"Authorization": f"Bearer {token}"}
        )
        payload = assert_error(response, 403, "DENIED")
        assert payload["errors"][0]["detail"]["scope"] == "repository:mirror/team/app:pull"
        anonymous = berth.api.manifest("mirror/team/app", "v1")
        assert_error(anonymous, 401, "UNAUTHORIZED")

    # Not cached yet: a refusal that reached the cache would fetch from the upstream.
    refused_as_other("uncached")
    assert upstream.requests == []
    _stored_nothing(berth.process.root)

    crane = crane_as(berth, tmp_path, "puller")
    assert crane("digest", ref).stdout.strip() == digest
    crane("pull", "--format", "oci", ref, tmp_path / "pulled")
    # containerd's form: the upstream's name, its host in ?ns=.
    token = berth.token("repository:mirror/team/app:pull", basic("puller"))
    response = berth.api.get(
        f"/v2/team/app/manifests/v1?ns={ns}", {"Authorization": f"Bearer {token}"}
    )
    assert response.status == 200, response
    asked = len(upstream.requests)
    assert asked > 0

    # Cached now: still refused, and still nothing asked of the upstream.
    refused_as_other("cached")
    assert len(upstream.requests) == asked


def test_containerd_ns_selects_an_upstream_on_a_port_by_default(
    registry_process: Start, upstream: HangingUpstream, tmp_path: Path
) -> None:
    """Without `hosts`, ?ns=<the upstream URL's host:port> selects that upstream."""
    digest, _ = _image(upstream, tmp_path / "img")
    berth = registry_process("berth", config=mirror_config(upstream.url))
    ns = upstream.url.removeprefix("http://")  # what containerd sends for 127.0.0.1:<port>/app
    response = Registry(berth.url).get(f"/v2/app/manifests/v1?ns={ns}", {"Accept": MANIFEST_ACCEPT})
    assert response.status == 200, response
    assert response.header("Docker-Content-Digest") == digest
    assert upstream.requests  # fetched through the cache, not looked up as a local "app"


def test_a_blob_cached_for_one_upstream_is_linked_for_another_only_if_it_serves_it(
    registry_process: Start,
) -> None:
    """A digest known from one mirror opens nothing in another whose upstream lacks it;
    where that upstream has it too, it is linked after a HEAD, not fetched again."""
    layer = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    serve = contextlib.contextmanager(FakeUpstream.serve)
    with serve(FakeUpstream()) as first, serve(FakeUpstream()) as other:
        first.blobs[digest] = layer
        upstreams = [
            {"name": name, "url": up.url, "prefix": name, "timeout_seconds": 2}
            for name, up in (("mirror-a", first), ("mirror-b", other))
        ]
        berth = registry_process("berth", config={"upstreams": upstreams})
        api = Registry(berth.url)
        assert api.blob("mirror-a/team/app", digest) == layer

        refused = api.get(f"/v2/mirror-b/team/app/blobs/{digest}")
        assert refused.status == 404 and refused.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert other.requests == [f"HEAD /v2/team/app/blobs/{digest}"], other.requests

        other.blobs[digest] = layer
        assert api.blob("mirror-b/team/app", digest) == layer
        assert f"GET /v2/team/app/blobs/{digest}" not in other.requests, other.requests


def test_one_layer_pulled_at_once_through_two_repositories_serves_both(
    registry_process: Start,
) -> None:
    """A base layer shared by two mirrored images, pulled by both at once: one fetch,
    and the requests for the second repository (which waited for it) get the bytes too."""
    layer = os.urandom(16 << 20)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    with contextlib.contextmanager(FakeUpstream.serve)(FakeUpstream()) as upstream:
        upstream.blobs[digest] = layer
        berth = registry_process("berth", config=mirror_config(upstream.url))
        api = Registry(berth.url)

        def get(repo: str) -> tuple[int, str]:
            response = api.get(f"/v2/{repo}/blobs/{digest}")
            return response.status, "sha256:" + hashlib.sha256(response.body).hexdigest()

        repos = ["mirror/team/a", "mirror/team/b"] * 4
        with concurrent.futures.ThreadPoolExecutor(len(repos)) as pool:
            results = list(pool.map(get, repos))
        assert results == [(200, digest)] * len(repos), results
        fetches = [r for r in upstream.requests if r.startswith("GET") and digest in r]
        assert len(fetches) == 1, upstream.requests
