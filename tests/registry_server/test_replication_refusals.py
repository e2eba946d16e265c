"""What one refused change does to replication: it is set aside after about a minute of
refusals, so the changes after it (of every repository) go on; and what a peer sends by
digest is not held to the receiving region's quota nor logged there again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from registry_server import config
from registry_server.app import build_app
from registry_server.config import (
    Config,
    EndpointConfig,
    NotificationsConfig,
    PeerConfig,
    ReplicationConfig,
    StorageConfig,
)
from registry_server.events import notifier, peer_client
from registry_server.events import replicator as replicator_module
from registry_server.events.peer_client import PeerClient, PeerError, new_session
from registry_server.events.replicator import Replicator, _Peer
from registry_server.protocol import digests, errors, versions
from registry_server.protocol.quotas import Quota
from registry_server.services.blobs import BlobService
from registry_server.services.manifests import ManifestService
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.index import Change
from registry_server.storage.sqlite_index import SqliteIndex
from tests.registry_server.test_manifest_deletes import _image


def _replicator(
    tmp_path: Path,
    index: Any,
    kind: str = "berth",
    client: Any = None,
    name: str = "us",
    **settings: Any,
) -> tuple[Replicator, _Peer]:
    """A replicator of region eu with one peer at an address nothing answers, and its
    state for that peer (``client`` stands for the peer's client, where one is used)."""
    peer_config = PeerConfig(name=name, url="http://127.0.0.1:9", kind=kind)
    replicator = Replicator(
        ReplicationConfig(region="eu", peers=(peer_config,), **settings),
        index,
        BlobStore(FilesystemDriver(tmp_path)),
    )
    status = replicator_module.PeerStatus(name, "x", kind)
    return replicator, _Peer(peer_config, client, status, asyncio.Semaphore(1))


async def _attempts_until_done(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    succeed_after: int | None,
    takes_others: bool = True,
) -> tuple[bool, int]:
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    replicator, peer = _replicator(tmp_path, index)
    attempts = 0

    async def deliver(_peer: Any, _change: Change) -> None:
        nonlocal attempts
        attempts += 1
        if status == 0:  # our own content cannot be sent
            raise errors.RegistryError(errors.MANIFEST_INVALID)
        if succeed_after is None or attempts <= succeed_after:
            raise PeerError(f"HTTP {status}", status, retryable=True)

    async def no_wait(_seconds: float) -> None:
        return None

    async def takes_our_requests(_peer: Any) -> bool:
        return takes_others

    monkeypatch.setattr(replicator, "_deliver", deliver)
    monkeypatch.setattr(replicator, "_takes_our_requests", takes_our_requests)
    monkeypatch.setattr(replicator_module.asyncio, "sleep", no_wait)
    change = Change(1, "team/app", "tag", "v1", "sha256:" + "a" * 64, 1, "eu", 0.0)
    try:
        done = await replicator._deliver_with_retry(peer, change)
    finally:
        await index.close()
    return done, attempts


async def test_a_change_the_peer_keeps_refusing_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository at its quota over there, a project missing on a one-way target:
    retried forever, it held up every change after it (found by review)."""
    done, attempts = await _attempts_until_done(tmp_path, monkeypatch, 403, None)
    assert not done and attempts == replicator_module._REFUSED_ATTEMPTS


async def test_a_peer_refusing_all_our_requests_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our account lost its rights there, or an ingress answers 404 to everything: the
    change is kept, or a delete set aside would be lost for good (found by review)."""
    done, attempts = await _attempts_until_done(tmp_path, monkeypatch, 403, 40, takes_others=False)
    assert done and attempts == 41


async def test_a_change_that_cannot_be_sent_is_set_aside_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored manifest that no longer parses raised out of the loop, which started
    again on the same change, for good."""
    done, attempts = await _attempts_until_done(tmp_path, monkeypatch, 0, None)
    assert not done and attempts == 1


def test_bearer_tokens_are_kept_for_the_latest_scopes_only() -> None:
    """One token per repository, never dropped: it grew with the repositories."""
    client = PeerClient(PeerConfig(name="us", url="http://127.0.0.1:9"), None)  # type: ignore[arg-type]
    for i in range(3000):
        client._keep_token(f"repository:r{i}:pull", f"Bearer {i}")
    assert len(client._tokens) == peer_client._TOKENS_KEPT
    assert client._tokens["repository:r2999:pull"] == "Bearer 2999"
    assert "repository:r0:pull" not in client._tokens


async def test_a_peer_failing_as_a_whole_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done, attempts = await _attempts_until_done(tmp_path, monkeypatch, 503, 40)
    assert done and attempts == 41


async def test_what_a_peer_sends_by_digest_is_not_held_to_the_quota_nor_logged_again(
    tmp_path: Path,
) -> None:
    index = SqliteIndex(tmp_path / "index.db", "us", ["ap"])
    full = Quota(storage=1)  # nothing more fits
    blobs = BlobService(BlobStore(FilesystemDriver(tmp_path)), index, quota=lambda _: full)
    service = ManifestService(index, 1 << 20, quota=lambda _: full)
    try:
        await index.link_blob("r", str(digests.of_bytes(b"{}")), 2)
        body = _image(1)
        digest = str(digests.of_bytes(body))
        with pytest.raises(errors.RegistryError):  # a push of this region's own
            await service.put("r", digest, body, None)
        await service.put("r", digest, body, None, replicated=True)
        assert await index.get_manifest("r", digest) is not None
        assert await index.pending_changes("ap", 10) == []  # not forwarded again
        with pytest.raises(errors.RegistryError) as caught:  # a tag needs the push's stamp
            await service.put("r", "latest", body, None, replicated=True)
        assert caught.value.error is errors.DENIED
        await blobs.start_upload("r", quota_exempt=True)
        with pytest.raises(errors.RegistryError):
            await blobs.start_upload("r")
    finally:
        await index.close()


def test_a_region_name_peers_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    """Every change's stamp names the region: with a space in it, peers refused them all
    (400, not retried) and every change was lost (found by review)."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "replication: {region: eu west, peers: [{name: us, url: 'http://127.0.0.1:9'}]}\n"
    )
    with pytest.raises(config.ConfigError, match=r"replication\.region must be 1 to 63"):
        config.load(path, env={})


def test_a_stamp_far_ahead_of_this_regions_clock_is_refused() -> None:
    """A peer's clock far ahead would win every concurrent write and drag this clock
    along, up to the largest version, after which every local change failed."""
    now = time.time()
    near = versions.Stamp(versions.tick(0, int((now + 60) * 1000)), "us")
    far = versions.Stamp(versions.tick(0, int((now + 3600) * 1000)), "us")
    top = versions.Stamp(versions.MAX_VERSION, "us")
    assert not versions.too_far_ahead(near, now)
    assert versions.too_far_ahead(far, now) and versions.too_far_ahead(top, now)


async def test_whether_a_peer_takes_our_requests_is_asked_of_the_peer(tmp_path: Path) -> None:
    """The question before a change is set aside goes to the peer itself: a Berth peer
    that lets us replicate says yes, an address nothing answers at says no."""
    server = TestServer(build_app(Config(storage=StorageConfig(root=tmp_path / "peer"))))
    await server.start_server()
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    session = new_session(aiohttp.ClientTimeout(total=10))
    try:
        replicator = Replicator(
            ReplicationConfig(region="eu"), index, BlobStore(FilesystemDriver(tmp_path))
        )
        for url, expected in (
            (str(server.make_url("")).rstrip("/"), True),
            ("http://127.0.0.1:9", False),
        ):
            peer_config = PeerConfig(name="us", url=url)
            peer = _Peer(
                peer_config,
                PeerClient(peer_config, session),
                replicator_module.PeerStatus("us", url, "berth"),
                asyncio.Semaphore(1),
            )
            assert await replicator._takes_our_requests(peer) is expected
    finally:
        await session.close()
        await index.close()
        await server.close()


class _Backlog:
    """The change log as the delivery loop sees it: a backlog of N changes, in batches."""

    def __init__(self, n: int) -> None:
        self.changes = [
            Change(i, "team/app", "tag", "v", "sha256:" + "a" * 64, i, "eu", 0.0)
            for i in range(1, n + 1)
        ]
        self.acked = 0
        self.counted = 0
        self.drained = asyncio.Event()

    async def pending_changes(self, peer: str, limit: int) -> list[Change]:
        if self.acked >= len(self.changes):
            self.drained.set()
        return self.changes[self.acked : self.acked + limit]

    async def ack_change(self, peer: str, seq: int) -> None:
        self.acked = seq

    async def queue_stats(self, peer: str) -> tuple[int, float | None]:
        self.counted += 1
        return len(self.changes) - self.acked, None


async def test_a_backlog_is_counted_once_a_second_not_for_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting reads the whole queue: for every batch of 64 it cost N²/64 rows to catch
    up N changes (found by review)."""
    backlog = _Backlog(64 * 50)
    replicator, peer = _replicator(tmp_path, backlog)

    async def deliver(_peer: Any, _change: Change) -> bool:
        return True

    monkeypatch.setattr(replicator, "_deliver_with_retry", deliver)
    loop = asyncio.create_task(replicator._deliver_loop(peer))
    try:
        async with asyncio.timeout(30):
            await backlog.drained.wait()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert backlog.acked == 64 * 50
    assert backlog.counted <= 5, backlog.counted  # 50 batches; the empty queue counted
    assert peer.status.queue_depth == 0


async def test_failing_anti_entropy_rounds_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that keeps failing is tried again soon, then less and less often, up to
    the interval (it was every 5 s with a traceback each time)."""
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    replicator, peer = _replicator(tmp_path, index, anti_entropy_interval_seconds=60)
    waits: list[float] = []

    async def failing(_peer: Any) -> int:
        raise RuntimeError("a bug")

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 6:
            raise asyncio.CancelledError

    monkeypatch.setattr(replicator, "anti_entropy", failing)
    monkeypatch.setattr(replicator_module.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        await replicator._anti_entropy_loop(peer)
    await index.close()
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


async def test_a_webhooks_backlog_is_counted_once_a_second_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backlog = _Backlog(32 * 50)
    endpoint = EndpointConfig(name="audit", url="http://127.0.0.1:9/hook")
    sender = notifier.Notifier(
        NotificationsConfig(endpoints=(endpoint,)),
        backlog,  # type: ignore[arg-type]
        notifier.Source("eu:5000", "eu", "http://eu:5000"),
    )

    async def event(_change: Change) -> dict[str, Any]:
        return {"action": "push", "target": {}}

    async def deliver(*_args: Any) -> None:
        return None

    monkeypatch.setattr(sender, "_event", event)
    monkeypatch.setattr(sender, "_deliver", deliver)
    wake = asyncio.Event()
    while backlog.acked < 32 * 50:
        await sender._round(None, None, endpoint, "audit", wake)  # type: ignore[arg-type]
    assert backlog.counted <= 3, backlog.counted  # 50 batches


async def test_anti_entropy_passes_over_a_failing_repository_and_resumes_where_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One repository whose comparison fails while the peer takes our other requests (a
    referrer over its quota there, a blob missing here) ended every round there, and a
    round that failed started again from the first repository: the ones after it were
    never compared (found by review). A failure of the peer as a whole still ends the
    round, and the next goes on from there."""
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    replicator, peer = _replicator(tmp_path, index, kind="oci")
    names = [f"r{i}" for i in range(6)]
    for name in names:
        await index.link_blob(name, "sha256:" + "a" * 64, 1)
    compared: list[str] = []
    failures = {
        "r1": PeerError("HTTP 403", 403),
        "r2": PeerError("local blob missing", retryable=False),
        "r3": PeerError("unreachable", None),
    }
    peer_up = True

    async def repair(_peer: Any, repo: str) -> int:
        nonlocal peer_up
        compared.append(repo)
        failure = failures.pop(repo, None)
        if failure is not None:
            peer_up = failure.status is not None or not failure.retryable
            raise failure
        return 1

    async def takes_our_requests(_peer: Any) -> bool:
        return peer_up

    monkeypatch.setattr(replicator, "_repair_oci", repair)
    monkeypatch.setattr(replicator, "_takes_our_requests", takes_our_requests)
    try:
        with pytest.raises(PeerError, match="unreachable"):
            await replicator.anti_entropy(peer)  # r1, r2 passed over; r3: the peer is down
        assert compared == ["r0", "r1", "r2", "r3"]
        assert "anti-entropy of r2" in (peer.status.last_error or "")
        peer_up = True
        assert await replicator.anti_entropy(peer) == 3  # from r3 on
        assert compared[4:] == ["r3", "r4", "r5"]
        assert await replicator.anti_entropy(peer) == 6  # and then from the start
    finally:
        await index.close()


async def test_an_oci_peer_is_asked_about_tags_written_since_its_last_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain registry has no state to compare but by a HEAD per tag: every tag of
    every repository was asked about every round (a minute), 10,000 tags a HEAD each."""
    index = SqliteIndex(tmp_path / "index.db", "eu", ["dr"])
    asked: list[str] = []
    held: dict[str, str] = {}

    class Peer:
        async def manifest_digest(self, _repo: str, reference: str) -> str | None:
            asked.append(reference)
            return held.get(reference)

    replicator, peer = _replicator(tmp_path, index, kind="oci", client=Peer(), name="dr")
    sent: list[str] = []

    async def deliver(_peer: Any, change: Change) -> bool:
        sent.append(str(change.tag))
        held[str(change.tag)] = str(change.digest)
        return True

    monkeypatch.setattr(replicator, "_deliver_with_retry", deliver)
    # No margin at first: a tag written just before a check counts as checked.
    monkeypatch.setattr(replicator_module, "_OCI_MARGIN_SECONDS", 0.0)
    images = [_image(n) for n in range(4)]
    service = ManifestService(index, 1 << 20)
    await index.link_blob("app", str(digests.of_bytes(b"{}")), 2)
    try:
        for n in range(3):
            await service.put("app", f"v{n}", images[n], None)
        assert await replicator.anti_entropy(peer) == 3
        assert sorted(asked) == sorted(sent) == ["v0", "v1", "v2"]
        asked.clear()
        assert await replicator.anti_entropy(peer) == 0
        assert asked == []  # nothing written since: nothing asked
        await service.put("app", "v3", images[3], None)
        held.pop("v0")  # gone there: seen at the next full check
        assert await replicator.anti_entropy(peer) == 1
        assert asked == ["v3"]
        asked.clear()
        checked = peer.oci_checked["app"]
        peer.oci_checked["app"] = replicator_module._OciChecked(
            checked.at - replicator_module._OCI_RECHECK_SECONDS, checked.referrers
        )
        assert await replicator.anti_entropy(peer) == 1
        assert sorted(asked) == ["v0", "v1", "v2", "v3"] and sent[-1] == "v0"
        # With the margin, what was written shortly before the last check is asked
        # about again (a write that committed after the check began was not seen).
        asked.clear()
        monkeypatch.setattr(replicator_module, "_OCI_MARGIN_SECONDS", 300.0)
        assert await replicator.anti_entropy(peer) == 0
        assert sorted(asked) == ["v0", "v1", "v2", "v3"]
    finally:
        await index.close()
