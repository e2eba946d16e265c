"""Robustness with a real berth process: concurrency, SIGKILL mid-upload, bounded memory.

- concurrent uploads of one blob and concurrent pushes of one tag are safe;
- killing the server (SIGKILL) while uploads, chunked PATCHes, a long streamed body and tag
  pushes are in flight loses nothing that was acknowledged, leaves no blob file whose content
  does not match its digest, and every interrupted upload either resumes to the right digest
  or is reported unknown;
- a 1 GiB streamed upload (generated on the fly) keeps the server's peak RSS bounded.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.clients import (
    Registry,
    Response,
    blob_file,
    blob_tree_problems,
    canonical_json,
    digest_of_chunks,
    image_manifest,
    pattern_chunks,
    peak_rss_bytes,
    request_bytes,
    sha256,
)
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]
MiB = 1 << 20


def _uploads(root: Path) -> list[str]:
    directory = root / "uploads"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_uploads_of_the_same_blob(registry_process: Start) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    data = os.urandom(6 * MiB)
    digest = sha256(data)
    barrier = threading.Barrier(8)

    def monolithic(repo: str) -> Response:
        location = api.start_upload(repo)
        barrier.wait()
        return api.finish(location, digest, data)

    def single_post(repo: str) -> Response:
        barrier.wait()
        return api.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?digest={digest}",
            data,
            {"Content-Type": "application/octet-stream"},
        )

    def chunked(repo: str) -> Response:
        location = api.start_upload(repo)
        barrier.wait()
        for start in range(0, len(data), MiB):
            response = api.patch(location, data[start : start + MiB], start)
            assert response.status == 202, response
        return api.finish(location, digest)

    def streamed(repo: str) -> Response:
        location = api.start_upload(repo)
        barrier.wait()
        chunks = (data[i : i + 64 * 1024] for i in range(0, len(data), 64 * 1024))
        response = api.request("PATCH", location, chunks)
        assert response.status == 202, response
        return api.finish(location, digest)

    # Eight uploads at once, two of each kind; half into one repository, half spread out.
    jobs = [
        (kind, repo)
        for kind, repo in zip(
            [monolithic, single_post, chunked, streamed] * 2,
            ["same/repo"] * 4 + ["other/a", "other/b", "other/c", "other/d"],
            strict=True,
        )
    ]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))

    for response in results:
        assert response.status == 201, response
        assert response.header("Docker-Content-Digest") == digest
    for repo in {repo for _, repo in jobs}:
        assert api.blob(repo, digest) == data
    assert blob_file(registry.root, digest).read_bytes() == data
    assert blob_tree_problems(registry.root) == []
    assert _uploads(registry.root) == []


def test_concurrent_pushes_of_the_same_tag(registry_process: Start) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    repo = "race/tag"
    manifests = []
    for number in range(8):
        config = canonical_json({"variant": number})
        api.push_blob(repo, config)
        manifests.append(image_manifest(config, []))
    digests = {sha256(m) for m in manifests}

    for round_number in range(5):
        barrier = threading.Barrier(len(manifests))

        def push(manifest: bytes, barrier: threading.Barrier = barrier) -> Response:
            barrier.wait()
            return api.put_manifest(repo, "latest", manifest)

        with ThreadPoolExecutor(len(manifests)) as pool:
            results = list(pool.map(push, manifests))
        for response in results:
            assert response.status == 201, (round_number, response)

        # One winner, seen the same way by GET, HEAD and the tag list.
        got = api.manifest(repo, "latest")
        assert got.status == 200, got
        winner = sha256(got.body)
        assert winner in digests
        assert got.header("Docker-Content-Digest") == winner
        head = api.request("HEAD", f"/v2/{repo}/manifests/latest")
        assert head.header("Docker-Content-Digest") == winner
        assert head.header("Content-Length") == str(len(got.body))
        assert api.tags(repo) == ["latest"]
        # Every pushed manifest is stored whole under its digest.
        for manifest in manifests:
            assert api.manifest(repo, sha256(manifest)).body == manifest


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_racing_the_final_put(registry_process: Start, workers: int) -> None:
    """DELETE on a session while its final PUT runs: one of them wins, never a corrupt blob.

    With two workers the requests usually land in different processes, so only the storage
    layer, not an in-process lock, can keep the outcome clean.
    """
    registry = registry_process("berth", config={"http": {"workers": workers}})
    api = Registry(registry.url)
    rng = random.Random(workers)
    outcomes: dict[tuple[int, int], int] = {}
    for attempt in range(40):
        data = os.urandom(rng.choice([64 * 1024, MiB, 2 * MiB]))
        digest = sha256(data)
        location = api.start_upload("race/cancel")
        assert api.patch(location, data, 0).status == 202
        with ThreadPoolExecutor(2) as pool:
            put = pool.submit(api.finish, location, digest)
            time.sleep(rng.random() * 0.01)
            delete = pool.submit(api.request, "DELETE", location)
            put_response, delete_response = put.result(), delete.result()
        key = (put_response.status, delete_response.status)
        outcomes[key] = outcomes.get(key, 0) + 1
        assert put_response.status in (201, 404), (attempt, put_response)
        assert delete_response.status in (204, 404), (attempt, delete_response)
        if put_response.status == 404:
            assert put_response.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        if put_response.status == 201:
            assert api.blob("race/cancel", digest) == data, attempt
        else:
            assert not api.blob_exists("race/cancel", digest), attempt
        problems = blob_tree_problems(registry.root)
        assert problems == [], (attempt, outcomes, problems)


# -- SIGKILL in the middle of uploads ---------------------------------------------------------


@dataclass
class Session:
    """An upload the client had started when the server died."""

    repo: str
    location: str
    data: bytes
    acked: int = 0  # bytes the server acknowledged


@dataclass
class Ledger:
    """What the server acknowledged before it was killed, filled by the worker threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    blobs: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # digest -> repo, data
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    streams: list[tuple[str, int, int]] = field(default_factory=list)  # location, seed, total
    errors: list[str] = field(default_factory=list)


def _dead(exc: BaseException) -> bool:
    """Whether an exception is what a client sees when the server dies under it."""
    return isinstance(exc, OSError | http.client.HTTPException)


def _chunked_worker(api: Registry, repo: str, ledger: Ledger, stop: threading.Event) -> None:
    while not stop.is_set():
        session = Session(repo, api.start_upload(repo), os.urandom(3 * MiB + 12345))
        with ledger.lock:
            ledger.sessions.append(session)
        for start in range(0, len(session.data), 256 * 1024):
            response = api.patch(session.location, session.data[start : start + 256 * 1024], start)
            if response.status != 202:
                ledger.errors.append(f"PATCH: {response!r}")
                return
            session.acked = start + len(session.data[start : start + 256 * 1024])
        response = api.finish(session.location, sha256(session.data))
        if response.status != 201:
            ledger.errors.append(f"PUT: {response!r}")
            return
        with ledger.lock:
            ledger.sessions.remove(session)
            ledger.blobs[sha256(session.data)] = (repo, session.data)


def _monolithic_worker(api: Registry, repo: str, ledger: Ledger, stop: threading.Event) -> None:
    while not stop.is_set():
        data = os.urandom(MiB + 7)
        digest = api.push_blob(repo, data)
        with ledger.lock:
            ledger.blobs[digest] = (repo, data)


def _tag_worker(api: Registry, repo: str, ledger: Ledger, stop: threading.Event) -> None:
    number = 0
    while not stop.is_set():
        config = canonical_json({"number": number, "nonce": os.urandom(8).hex()})
        layer = os.urandom(64 * 1024)
        api.push_blob(repo, config)
        api.push_blob(repo, layer)
        manifest = image_manifest(config, [layer])
        tag = f"t{number}"
        digest = api.push_manifest(repo, tag, manifest)
        with ledger.lock:
            ledger.tags[tag] = digest
            ledger.manifests[digest] = manifest
            ledger.blobs[sha256(config)] = (repo, config)
            ledger.blobs[sha256(layer)] = (repo, layer)
        number += 1


def _stream_worker(api: Registry, repo: str, ledger: Ledger, stop: threading.Event) -> None:
    """One long PATCH on a raw socket, sent slowly: its body is mid-flight at the kill."""
    seed, total = int.from_bytes(os.urandom(4), "big"), 128 * MiB
    location = api.start_upload(repo)
    with ledger.lock:
        ledger.streams.append((location, seed, total))
    parts = urlsplit(api.url)
    head = request_bytes(
        api.url,
        "PATCH",
        location,
        {"Content-Length": str(total), "Content-Type": "application/octet-stream"},
    )
    with socket.create_connection((parts.hostname, parts.port), 10) as sock:
        sock.sendall(head)
        for chunk in pattern_chunks(total, 256 * 1024, seed):
            sock.sendall(chunk)
            time.sleep(0.01)


def _run_until_killed(registry: RegistryProcess, api: Registry, ledger: Ledger) -> None:
    stop = threading.Event()
    workers: list[tuple[Callable[[Registry, str, Ledger, threading.Event], None], str]] = [
        (_chunked_worker, "crash/chunked"),
        (_chunked_worker, "crash/chunked"),
        (_chunked_worker, "crash/other"),
        (_monolithic_worker, "crash/mono"),
        (_monolithic_worker, "crash/mono"),
        (_tag_worker, "crash/tags"),
        (_stream_worker, "crash/stream"),
    ]
    failures: list[BaseException] = []

    def run(worker: Callable[[Registry, str, Ledger, threading.Event], None], repo: str) -> None:
        try:
            worker(api, repo, ledger, stop)
        except BaseException as exc:  # the kill surfaces as connection errors: expected
            if not stop.is_set() or not _dead(exc):
                failures.append(exc)

    threads = [threading.Thread(target=run, args=w, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    assert not failures, failures
    assert not ledger.errors, ledger.errors
    stop.set()
    registry.kill()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert not failures, failures
    assert not ledger.errors, ledger.errors


def _range_end(response: Response) -> int:
    """The session's offset from `Range: 0-<last>` (a session holds more than one byte here)."""
    value = response.header("Range") or ""
    last = int(value.split("-")[1])
    return 0 if last == 0 else last + 1


def _resume_or_unknown(
    api: Registry,
    location: str,
    data_from: Callable[[int], Iterator[bytes]],
    digest: str,
    low: int,
    high: int,
) -> str:
    status = api.get(location)
    if status.status == 404:
        assert status.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN", status
        return "unknown"
    assert status.status == 204, status
    offset = _range_end(status)
    assert low <= offset <= high, (location, low, offset, high)
    response = api.request("PATCH", location, data_from(offset))
    assert response.status == 202, response
    response = api.finish(location, digest)
    assert response.status == 201, response
    return "resumed"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_upload_loses_nothing_committed(registry_process: Start, workers: int) -> None:
    registry = registry_process("berth", config={"http": {"workers": workers}})
    api = Registry(registry.url, timeout=20)
    # Committed before any trouble starts.
    baseline = Ledger()
    for size in (1, 1000, 300 * 1024):
        data = os.urandom(size)
        baseline.blobs[api.push_blob("crash/base", data)] = ("crash/base", data)
    image, manifest = api.push_image("crash/base", "v1", [os.urandom(10_000)])
    baseline.tags["v1"] = image
    baseline.manifests[image] = manifest

    outcomes: list[str] = []
    for _round in range(3):
        ledger = Ledger()
        _run_until_killed(registry, api, ledger)

        # On disk, before the restart: no blob file holds anything but its digest's content.
        assert blob_tree_problems(registry.root) == []
        with sqlite3.connect(registry.root / "index.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

        registry.restart()
        assert api.get("/readyz").status == 200

        # Everything acknowledged, in this round and before, is intact.
        for committed in (baseline, ledger):
            for digest, (repo, data) in committed.blobs.items():
                got = api.get(f"/v2/{repo}/blobs/{digest}")
                assert got.status == 200, f"committed blob {digest} lost: {got!r}"
                assert sha256(got.body) == digest and got.body == data
        assert api.manifest("crash/base", "v1").body == manifest
        tags = set(api.tags("crash/tags") or [])
        for tag, digest in ledger.tags.items():
            assert tag in tags
            got = api.manifest("crash/tags", tag)
            assert got.header("Docker-Content-Digest") == digest
            assert got.body == ledger.manifests[digest]
        for tag in tags:  # a tag the client never saw acknowledged may exist, but whole
            got = api.manifest("crash/tags", tag)
            assert got.status == 200 and sha256(got.body) == got.header("Docker-Content-Digest")

        # Interrupted uploads resume to the right digest, or are reported unknown.
        for session in ledger.sessions:
            data = session.data
            outcome = _resume_or_unknown(
                api, session.location, _rest_of_bytes(data), sha256(data), session.acked, len(data)
            )
            if outcome == "resumed":
                assert api.blob(session.repo, sha256(data)) == data
            outcomes.append(outcome)
        for location, seed, total in ledger.streams:
            digest = digest_of_chunks(pattern_chunks(total, 256 * 1024, seed))
            rest = _rest_of_pattern(total, seed)
            outcomes.append(_resume_or_unknown(api, location, rest, digest, 0, total))
        assert blob_tree_problems(registry.root) == []
    # The test is only meaningful if interrupted uploads were really there to recover.
    assert "resumed" in outcomes, outcomes


def _rest_of_bytes(data: bytes) -> Callable[[int], Iterator[bytes]]:
    return lambda offset: iter([data[offset:]])


def _rest_of_pattern(total: int, seed: int) -> Callable[[int], Iterator[bytes]]:
    """`pattern_chunks(total, 256 KiB, seed)` from a byte offset on."""

    def rest(offset: int) -> Iterator[bytes]:
        skip, cut = divmod(offset, 256 * 1024)
        chunks = islice(pattern_chunks(total, 256 * 1024, seed), skip, None)
        return chain([next(chunks)[cut:]], chunks)

    return rest


# -- bounded memory -------------------------------------------------------------------------


def _streamed_digest(api: Registry, path: str) -> tuple[str, int]:
    """GET a blob in 1 MiB reads, hashing as it comes; returns (digest, size)."""
    parts = urlsplit(api.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, response.status
        hasher, size = hashlib.sha256(), 0
        while chunk := response.read(MiB):
            hasher.update(chunk)
            size += len(chunk)
        return "sha256:" + hasher.hexdigest(), size
    finally:
        conn.close()


def test_streamed_1gib_upload_keeps_memory_bounded(registry_process: Start) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url, timeout=300)
    pid = registry.process.pid
    assert pid is not None
    total, seed = 1 << 30, 42
    digest = digest_of_chunks(pattern_chunks(total, MiB, seed))
    before = peak_rss_bytes(pid)

    # Streamed PATCH (chunked transfer encoding, no Content-Range), then PUT to commit.
    location = api.start_upload("big/blob")
    response = api.request(
        "PATCH",
        location,
        pattern_chunks(total, MiB, seed),
        {"Content-Type": "application/octet-stream"},
    )
    assert response.status == 202, response
    assert response.header("Range") == f"0-{total - 1}"
    assert api.finish(location, digest).status == 201

    assert blob_file(registry.root, digest).stat().st_size == total
    assert _streamed_digest(api, f"/v2/big/blob/blobs/{digest}") == (digest, total)
    peak = peak_rss_bytes(pid)
    assert peak < 200 * MiB, f"peak RSS {peak / MiB:.0f} MiB (was {before / MiB:.0f} MiB)"
