"""The replication worker: ships the local change log to every peer, and repairs drift.

Per peer, one delivery loop reads the durable log in order (blobs before manifests,
children before indexes, referrers after their subject), retrying with exponential
backoff and jitter until the peer has the change, then advances the peer's cursor.
An anti-entropy loop compares state with the peer on a schedule and at start-up and
pushes whatever the peer lacks or has older, so a peer that was down, partitioned or
newly added converges without any event. Each side pushes only what it holds newer;
the peer does the same in its own loop, so two-way peers converge in both directions.

With several replicas on one database, each peer's loops run in one replica at a time,
the one elected for the task ``replication:<peer>`` (``storage/election.py``); tombstone
expiry is the task ``replication-tombstones``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from prometheus_client import Counter, Gauge

from registry_server.config import PeerConfig, ReplicationConfig
from registry_server.events.background import run_elected
from registry_server.events.peer_client import PeerClient, PeerError, new_session
from registry_server.protocol import digests, errors, manifests
from registry_server.protocol.versions import Stamp
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.election import Election, LocalElection
from registry_server.storage.index import LOCAL_OPS, Change, ManifestRecord, MetadataIndex
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.replication")

QUEUE = Gauge("berth_replication_queue_depth", "Undelivered changes", ["peer"])
LAG = Gauge("berth_replication_lag_seconds", "Age of the oldest undelivered change", ["peer"])
LAST_SUCCESS = Gauge("berth_replication_last_success_timestamp", "Last delivery", ["peer"])
DELIVERED = Counter("berth_replication_delivered_total", "Changes delivered", ["peer"])
ERRORS = Counter("berth_replication_errors_total", "Failed delivery attempts", ["peer"])
REPAIRED = Counter("berth_replication_repaired_total", "Drift repaired by anti-entropy", ["peer"])
SET_ASIDE = Counter(
    "berth_replication_set_aside_total",
    "Changes a peer kept refusing, left to anti-entropy so the ones after them go on",
    ["peer"],
)

# Refusals that may concern one change (a quota, a project missing on a one-way target,
# a conflict): after this many attempts (about a minute) the peer is asked whether it
# takes our requests at all; if it does, the change is set aside, or it would hold up
# every change after it, of every repository. If not (our account lost its rights
# there, a misrouted ingress), or when the peer fails as a whole (unreachable, 5xx, 401,
# 429), it is waited out: nothing else would get through, and a change set aside
# that way (a delete) would be lost.
_REFUSALS = (403, 404, 409)
_REFUSED_ATTEMPTS = 8
_PAGE = 500
_SINGLE_POST_BYTES = 4 * 1024 * 1024
EMPTY_REPOSITORY_HASH = hashlib.sha256().hexdigest()


@dataclass
class PeerStatus:
    name: str
    url: str
    kind: str
    queue_depth: int = 0
    lag_seconds: float = 0.0
    delivered: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    anti_entropy_last_run: float | None = None
    anti_entropy_repaired: int = 0
    # The replica running this peer's delivery (elected). The figures above that are not
    # read from the database are that replica's: published through the election, so
    # every replica answers with the same.
    holder: str | None = None


# The holder's own figures, which it publishes for the other replicas to show.
_REPORTED = (
    "delivered",
    "last_success",
    "last_error",
    "last_error_at",
    "anti_entropy_last_run",
    "anti_entropy_repaired",
)
_PUBLISH_SECONDS = 1.0
# A plain OCI peer has no state to compare but by a HEAD per tag: a repository's tags are
# all asked about this often, and in between only those written here since the last
# check (less this margin, for a write that committed after the check began).
_OCI_RECHECK_SECONDS = 3600.0
_OCI_MARGIN_SECONDS = 300.0
_COUNT_SECONDS = 1.0  # how often a busy delivery loop counts its queue


@dataclass(frozen=True)
class _OciChecked:
    """A repository found complete on an OCI peer: when the check began, and the
    referrers it holds."""

    at: float
    referrers: frozenset[str]


@dataclass
class _Peer:
    config: PeerConfig
    client: PeerClient
    status: PeerStatus
    blob_slots: asyncio.Semaphore
    # Set when a local change is logged; one per peer so no loop consumes another's wake-up.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    counted_at: float = float("-inf")  # when the queue was last counted (monotonic)
    # Where an anti-entropy round that failed stopped: the next one goes on from there,
    # or a peer failing now and then had the first repositories compared again and again
    # and the last ones never.
    resume_after: str = ""
    oci_checked: dict[str, _OciChecked] = field(default_factory=dict)


def task_name(peer: PeerConfig) -> str:
    """The peer's elected task."""
    return f"replication:{peer.name}"


TOMBSTONES_TASK = "replication-tombstones"


class Replicator:
    def __init__(
        self,
        config: ReplicationConfig,
        index: MetadataIndex,
        store: BlobStore,
        election: Election | None = None,
        stays_local: Callable[[str], bool] = lambda repo: False,
    ) -> None:
        self.config = config
        # Repositories never sent to peers, changes nor repairs (the pull-through cache's).
        self.stays_local = stays_local
        self.index = index
        self.store = store
        self.election = election if election is not None else LocalElection()
        self._session: aiohttp.ClientSession | None = None
        self._peers: list[_Peer] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        self._session = new_session(timeout)
        for peer in self.config.peers:
            state = _Peer(
                peer,
                PeerClient(peer, self._session),
                PeerStatus(peer.name, peer.url, peer.kind),
                asyncio.Semaphore(peer.concurrency),
            )
            self._peers.append(state)
            self._tasks.append(
                asyncio.create_task(
                    run_elected(self.election, task_name(peer), functools.partial(self._run, state))
                )
            )
        self._tasks.append(
            asyncio.create_task(run_elected(self.election, TOMBSTONES_TASK, self._tombstone_loop))
        )
        log.info(
            "replication started",
            extra={"region": self.config.region, "peers": [p.name for p in self.config.peers]},
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        """A local change was logged: deliver now instead of at the next poll."""
        for peer in self._peers:
            peer.wake.set()

    async def status(self) -> dict[str, Any]:
        tasks = [task_name(p.config) for p in self._peers]
        holders = await self.election.holders(tasks)
        reports = await self.election.reports(tasks)
        for peer in self._peers:
            await self._refresh_queue(peer)
            task = task_name(peer.config)
            peer.status.holder = holders.get(task)
            if peer.status.holder != self.election.replica_id and task in reports:
                _apply_report(peer.status, reports[task])  # another replica delivers
        return {"region": self.config.region, "peers": [asdict(p.status) for p in self._peers]}

    # -- delivery ------------------------------------------------------------------------

    async def _run(self, peer: _Peer) -> None:
        """Everything for one peer, while elected: if one loop fails, both stop (and
        are started again together)."""
        task = task_name(peer.config)
        # Go on from the last holder's figures (a handover does not reset the counts).
        report = (await self.election.reports([task])).get(task)
        if report is not None:
            _apply_report(peer.status, report)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._deliver_loop(peer))
            group.create_task(self._anti_entropy_loop(peer))
            group.create_task(self._publish_loop(peer, task))

    async def _publish_loop(self, peer: _Peer, task: str) -> None:
        """Publish this holder's figures when they change (at most once a second)."""
        published = None
        while True:
            current = json.dumps({k: getattr(peer.status, k) for k in _REPORTED})
            if current != published:
                try:
                    await self.election.publish(task, current)
                    published = current
                except Exception as exc:  # only the status is late: never stop delivery
                    log.warning("could not publish the peer's status", extra={"error": repr(exc)})
            await asyncio.sleep(_PUBLISH_SECONDS)

    async def _refresh_queue(self, peer: _Peer) -> None:
        depth, oldest = await self.index.queue_stats(peer.config.name)
        peer.status.queue_depth = depth
        peer.status.lag_seconds = round(time.time() - oldest, 3) if oldest else 0.0
        QUEUE.labels(peer.config.name).set(depth)
        LAG.labels(peer.config.name).set(peer.status.lag_seconds)

    async def _deliver_loop(self, peer: _Peer) -> None:
        while True:
            # Clear before reading the log: a change logged after the read sets it again.
            peer.wake.clear()
            changes = await self.index.pending_changes(peer.config.name, 64)
            # Counting the queue reads all of it: once a second, not for every batch of a
            # backlog (that was N²/64 rows read to catch up N changes).
            if not changes or time.monotonic() - peer.counted_at >= _COUNT_SECONDS:
                peer.counted_at = time.monotonic()
                await self._refresh_queue(peer)
            if not changes:
                # Other worker processes log changes too: poll as well as wait for a wake-up.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(peer.wake.wait(), timeout=1.0)
                continue
            for change in changes:
                if change.op in LOCAL_OPS or self.stays_local(change.repo):
                    # Retention's removals (each region decides) and cache fills.
                    await self.index.ack_change(peer.config.name, change.seq)
                    continue
                delivered = await self._deliver_with_retry(peer, change)
                await self.index.ack_change(peer.config.name, change.seq)
                if delivered:
                    # Counted after the ack: the status never shows a delivered change queued.
                    self._record_success(peer)

    def _record_success(self, peer: _Peer) -> None:
        peer.status.delivered += 1
        peer.status.last_success = time.time()
        DELIVERED.labels(peer.config.name).inc()
        LAST_SUCCESS.labels(peer.config.name).set(peer.status.last_success)

    async def _deliver_with_retry(self, peer: _Peer, change: Change) -> bool:
        """Deliver until done (True) or refused for good (False: anti-entropy's turn)."""
        attempt = 0
        while True:
            try:
                await self._deliver(peer, change)
            except PeerError as exc:
                self._record_error(
                    peer, f"{change.op} {change.repo}:{change.tag or change.digest}: {exc}"
                )
                if not exc.retryable:
                    log.error(
                        "change rejected by peer; anti-entropy will retry",
                        extra={"peer": peer.config.name, "seq": change.seq, "error": str(exc)},
                    )
                    return False
                if (
                    exc.status in _REFUSALS
                    and attempt + 1 >= _REFUSED_ATTEMPTS
                    and await self._takes_our_requests(peer)
                ):
                    SET_ASIDE.labels(peer.config.name).inc()
                    log.error(
                        "change still refused by peer: set aside for anti-entropy",
                        extra={"peer": peer.config.name, "seq": change.seq, "error": str(exc)},
                    )
                    return False
            except errors.RegistryError as exc:
                # Our own content cannot be sent (a stored manifest that no longer parses):
                # no retry changes that, and it must not hold up the changes after it.
                self._record_error(peer, f"{change.op} {change.repo}: {exc!r}")
                log.error(
                    "change cannot be sent; set aside",
                    extra={"peer": peer.config.name, "seq": change.seq, "error": repr(exc)[:300]},
                )
                return False
            except (OSError, ValueError) as exc:
                self._record_error(peer, f"{change.op} {change.repo}: {exc!r}")
            else:
                return True
            attempt += 1
            delay = min(self.config.retry_max_seconds, 0.25 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _takes_our_requests(self, peer: _Peer) -> bool:
        """Whether the peer answers a request of ours that needs what replication needs:
        then a refusal concerns the change, not us."""
        try:
            if peer.config.kind == "berth":  # our account may replicate there
                await peer.client.get_json("/berth/v1/replication/hashes", {"repositories": []})
            else:  # our credentials are good there
                await peer.client.request("GET", "/v2/", "", expect=(200,), what="base")
        except (PeerError, OSError, ValueError):
            return False
        return True

    def _record_error(self, peer: _Peer, message: str) -> None:
        peer.status.last_error = message[:500]
        peer.status.last_error_at = time.time()
        ERRORS.labels(peer.config.name).inc()
        log.warning(
            "replication attempt failed", extra={"peer": peer.config.name, "error": message[:500]}
        )

    def _stamp(self, peer: _Peer, change: Change) -> Stamp | None:
        return Stamp(change.version, change.origin) if peer.config.kind == "berth" else None

    async def _deliver(self, peer: _Peer, change: Change) -> None:
        if change.op in ("tag", "manifest") and change.digest:
            record = await self.index.get_manifest(change.repo, change.digest)
            if record is None:
                return  # deleted since; the delete is later in the log
            await self._ensure_content(peer, change.repo, record)
            if change.op == "tag" and change.tag:
                await peer.client.put_manifest(
                    change.repo,
                    change.tag,
                    _content(record),
                    record.media_type,
                    self._stamp(peer, change),
                )
            else:
                await self._ensure_manifest(peer, change.repo, record)
            await self._ensure_referrers(peer, change.repo, record.digest)
        elif change.op == "delete_tag" and change.tag:
            if peer.config.kind == "berth":
                await peer.client.delete_manifest(
                    change.repo, change.tag, self._stamp(peer, change)
                )
            # Plain OCI registries cannot delete a tag alone; they receive images only.
        elif change.op == "delete_manifest" and change.digest:
            await peer.client.delete_manifest(change.repo, change.digest, self._stamp(peer, change))

    async def _ensure_manifest(self, peer: _Peer, repo: str, record: ManifestRecord) -> None:
        """Make the peer hold ``record`` by digest (with its content first)."""
        if await peer.client.manifest_digest(repo, record.digest) is not None:
            return
        await self._ensure_content(peer, repo, record)
        await peer.client.put_manifest(
            repo,
            record.digest,
            _content(record),
            record.media_type,
            None,
            record.stored_version if record.subject is not None else None,
        )

    async def _ensure_content(self, peer: _Peer, repo: str, record: ManifestRecord) -> None:
        """Children before the index, blobs before the manifest."""
        parsed = manifests.parse(_content(record), record.media_type)
        for child in parsed.children:
            child_record = await self.index.get_manifest(repo, str(child.digest))
            if child_record is None:
                raise PeerError(f"local child manifest {child.digest} missing", retryable=False)
            await self._ensure_manifest(peer, repo, child_record)
        await asyncio.gather(
            *(self._ensure_blob(peer, repo, digest) for digest in parsed.required_blobs())
        )

    async def _ensure_blob(self, peer: _Peer, repo: str, digest: str) -> None:
        async with peer.blob_slots:
            if await peer.client.blob_exists(repo, digest):
                return
            parsed = digests.parse(digest)
            size = await self.store.size(parsed)
            if size is None:
                raise PeerError(f"local blob {digest} missing", retryable=False)

            def source(offset: int, length: int) -> AsyncIterator[bytes]:
                return self.store.read(parsed, offset, length)

            # A peer usually mirrors our layout: try mounting from a sibling repository; a
            # refused mount still opens the upload session (202) used below.
            siblings = [r for r in await self.index.repositories_with_blob(digest) if r != repo]
            if not siblings and peer.config.kind == "berth" and size <= _SINGLE_POST_BYTES:
                # One round trip for small blobs (OCI single POST; not every registry has it).
                await peer.client.post_blob(repo, digest, size, source)
                return
            location = await peer.client.start_upload(
                repo, digest, siblings[0] if siblings else None
            )
            if location is not None:
                await peer.client.upload_blob(repo, digest, size, source, location)

    async def _ensure_referrers(self, peer: _Peer, repo: str, subject: str) -> None:
        for ref in await self.index.referrers(repo, subject):
            full = await self.index.get_manifest(repo, ref.digest)
            if full is not None:
                await self._ensure_manifest(peer, repo, full)

    # -- anti-entropy --------------------------------------------------------------------

    async def _anti_entropy_loop(self, peer: _Peer) -> None:
        failures = 0  # rounds failed in a row
        while True:
            try:
                repaired = await self.anti_entropy(peer)
                peer.status.anti_entropy_last_run = time.time()
                peer.status.anti_entropy_repaired += repaired
                if repaired:
                    REPAIRED.labels(peer.config.name).inc(repaired)
                    log.info(
                        "anti-entropy repaired drift",
                        extra={"peer": peer.config.name, "repaired": repaired},
                    )
            except Exception as exc:  # a round fails alone: delivery goes on meanwhile
                failures += 1
                if failures == 1 and not isinstance(
                    exc, (PeerError, OSError, ValueError, KeyError, TypeError)
                ):
                    log.exception("anti-entropy round failed", extra={"peer": peer.config.name})
                self._record_error(peer, f"anti-entropy: {exc}")
                # Soon after a first failure, then backing off to the interval.
                interval = self.config.anti_entropy_interval_seconds
                soon = min(5.0, interval)
                await asyncio.sleep(min(soon * 2 ** (failures - 1), max(interval, soon)))
                continue
            failures = 0
            await asyncio.sleep(self.config.anti_entropy_interval_seconds)

    async def anti_entropy(self, peer: _Peer) -> int:
        """One round over every repository (from where a failed round stopped). A
        repository whose comparison fails while the peer takes our other requests is
        passed over (a quota there, a manifest it does not take): the next round tries
        it again. A failure of the peer as a whole ends the round."""
        repaired = 0
        while True:
            listed = await self.index.list_repositories(_PAGE, peer.resume_after)
            if not listed:
                peer.resume_after = ""
                return repaired
            repos = [name for name in listed if not self.stays_local(name)]
            hashes: dict[str, str] | None = None
            if peer.config.kind == "berth":
                remote = await peer.client.get_json(
                    "/berth/v1/replication/hashes", {"repositories": repos}
                )
                hashes = remote.get("hashes", {})
            for name in repos:
                if hashes is not None:
                    mine = await self.index.repository_hash(name)
                    if hashes.get(name, EMPTY_REPOSITORY_HASH) == mine:
                        continue
                try:
                    if hashes is not None:
                        repaired += await self._repair_berth(peer, name)
                    else:
                        repaired += await self._repair_oci(peer, name)
                except (
                    PeerError,
                    errors.RegistryError,
                    OSError,
                    ValueError,
                    KeyError,
                    TypeError,
                ) as exc:
                    # The peer failing as a whole ends the round (to go on from here);
                    # anything else concerns this repository (a refusal, a reply too
                    # large, a blob missing here, a bad field): the others go on.
                    if not isinstance(exc, errors.RegistryError) and not (
                        await self._takes_our_requests(peer)
                    ):
                        raise
                    self._record_error(peer, f"anti-entropy of {name}: {exc}")
                peer.resume_after = name
            peer.resume_after = listed[-1]

    async def _repair_berth(self, peer: _Peer, repo: str) -> int:
        remote = await peer.client.get_json(
            f"/berth/v1/replication/state?repository={quote(repo, safe='')}"
        )
        theirs = {
            t["name"]: Stamp(int(t["version"]), str(t["origin"])) for t in remote.get("tags", [])
        }
        their_refs = set(remote.get("referrers", []))
        repaired = 0
        for state in await self.index.tag_states(repo):
            mine = Stamp(state.version, state.origin)
            current = theirs.get(state.name)
            if current is not None and current >= mine:
                continue
            op = "tag" if state.digest else "delete_tag"
            change = Change(
                0, repo, op, state.name, state.digest, state.version, state.origin, time.time()
            )
            if await self._deliver_with_retry(peer, change):
                self._record_success(peer)
            repaired += 1
        return repaired + await self._repair_referrers(peer, repo, remote, their_refs)

    async def _repair_referrers(
        self, peer: _Peer, repo: str, remote: dict[str, Any], their_refs: set[str]
    ) -> int:
        """Referrers have no tag to carry their version: a copy first stored before a
        delete (by digest, in either region; by their clock versions) loses to it, one
        stored after stands."""
        their_deleted = _deleted_referrers(remote)
        their_stored = _stored_referrers(remote)
        repaired = 0
        for ref in await self.index.referrer_states(repo):
            if ref.deleted is None:  # held here
                gone = their_deleted.get(ref.digest)
                if ref.digest in their_refs or (
                    gone is not None and ref.stored is not None and gone.version > ref.stored
                ):
                    continue  # the peer holds it, or deleted it since: that comes here
                record = await self.index.get_manifest(repo, ref.digest)
                if record is not None:
                    await self._ensure_manifest(peer, repo, record)
                    repaired += 1
            elif ref.digest in their_refs:  # deleted here, held there
                stored = their_stored.get(ref.digest)
                if stored is not None and stored < ref.deleted.version:
                    # Their copy is older than the delete, which did not reach them (set
                    # aside, or made while they were cut off).
                    await peer.client.delete_manifest(repo, ref.digest, ref.deleted)
                    repaired += 1
        return repaired

    async def _repair_oci(self, peer: _Peer, repo: str) -> int:
        """HEAD the tags written here since the repository was last found complete
        there (all of them at first and every _OCI_RECHECK_SECONDS), and the referrers
        not yet found there: every tag every round was a HEAD per tag per minute."""
        started = time.time()
        last = peer.oci_checked.get(repo)
        if last is not None and started - last.at >= _OCI_RECHECK_SECONDS:
            last = None
        since = None if last is None else last.at - _OCI_MARGIN_SECONDS
        repaired = 0
        complete = True
        for tag in await self.index.tag_details(repo, None, None) or []:
            if since is not None and tag.updated < since:
                continue
            if await peer.client.manifest_digest(repo, tag.name) == tag.digest:
                continue
            # An OCI peer takes no stamp: the change's version is not sent.
            change = Change(0, repo, "tag", tag.name, tag.digest, 0, "", time.time())
            if await self._deliver_with_retry(peer, change):
                self._record_success(peer)
            else:
                complete = False
            repaired += 1
        found = set(last.referrers) if last is not None else set()
        current = await self.index.referrer_digests(repo)
        for digest in current:
            if digest in found:
                continue
            record = await self.index.get_manifest(repo, digest)
            if record is not None:
                await self._ensure_manifest(peer, repo, record)
                found.add(digest)
        if complete:
            peer.oci_checked[repo] = _OciChecked(started, frozenset(found.intersection(current)))
        return repaired

    async def _tombstone_loop(self) -> None:
        while True:
            expired = await self.index.expire_tombstones(
                time.time() - self.config.tombstone_ttl_seconds
            )
            if expired:
                log.info("tombstones expired", extra={"count": expired})
            await asyncio.sleep(min(3600.0, max(1.0, self.config.tombstone_ttl_seconds / 10)))


def _deleted_referrers(remote: dict[str, Any]) -> dict[str, Stamp]:
    found: dict[str, Stamp] = {}
    for item in remote.get("deleted_referrers") or []:
        found[str(item["digest"])] = Stamp(int(item["version"]), str(item["origin"]))
    return found


def _stored_referrers(remote: dict[str, Any]) -> dict[str, int]:
    return {str(d): int(v) for d, v in (remote.get("referrers_stored") or {}).items()}


def _apply_report(status: PeerStatus, report: str) -> None:
    """Take the reported figures (a report from another version: whatever it has)."""
    try:
        figures = json.loads(report)
    except ValueError:
        return
    if isinstance(figures, dict):
        for key in _REPORTED:
            if key in figures:
                setattr(status, key, figures[key])


def _content(record: ManifestRecord) -> bytes:
    assert record.content is not None
    return record.content
