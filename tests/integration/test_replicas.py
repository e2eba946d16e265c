"""Several replicas of one registry: three server processes on one PostgreSQL database
and one prefix of an S3 bucket (SeaweedFS), as a Deployment's pods are.

What must happen once happens once: exactly one replica runs GC rounds, delivers to the
webhook receiver and replicates to the peer; SIGKILL of that replica hands every task
to another; and GC rounds interleaved with pushes on every replica never lose a blob
that a committed manifest needs.
"""

from __future__ import annotations

import collections
import os
import random
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_notifications import Receiver
from tests.integration.test_postgres_server import postgres_config
from tests.support.clients import Registry, canonical_json, image_manifest, sha256
from tests.support.processes import RegistryProcess
from tests.support.s3_store import S3Store

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]

REPLICATION_TASK = "replication:us"
WEBHOOK_TASK = "webhook:hook"
TASKS = ("gc", REPLICATION_TASK, "replication-tombstones", WEBHOOK_TASK)
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? ([-+.\deE]+|NaN)$")


def metrics(proc: RegistryProcess) -> dict[tuple[str, str], float]:
    """The process's samples: (name, labels as written) -> value."""
    found = {}
    for line in Registry(proc.url, timeout=10).get("/metrics").body.decode().splitlines():
        match = _SAMPLE.match(line)
        if match:
            found[(match[1], match[2] or "")] = float(match[3])
    return found


def metric(proc: RegistryProcess, name: str, labels: str = "") -> float:
    return metrics(proc).get((name, labels), 0.0)


def holders(replicas: dict[str, RegistryProcess]) -> dict[str, list[str]]:
    """Per task, the live replicas that say they run it."""
    held: dict[str, list[str]] = {task: [] for task in TASKS}
    for name, proc in replicas.items():
        if not proc.running:
            continue
        samples = metrics(proc)
        for task in TASKS:
            if samples.get(("berth_elected", f'task="{task}"')) == 1.0:
                held[task].append(name)
    return held


def until(check: Callable[[], Any], what: str, timeout: float = 60, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)
    return value


@dataclass
class Region:
    replicas: dict[str, RegistryProcess]
    peer: RegistryProcess
    receiver: Receiver
    prefix: str

    def api(self, name: str) -> Registry:
        return Registry(self.replicas[name].url)

    def alive(self) -> list[str]:
        return [n for n, p in self.replicas.items() if p.running]

    def single_holders(self) -> dict[str, str] | None:
        """Each task's one holder once every task has exactly one; None before. More
        than one holder of a task is never acceptable."""
        held = holders(self.replicas)
        for task, names in held.items():
            assert len(names) <= 1, f"{task} is run by {names}"
        if all(held.values()):
            return {task: names[0] for task, names in held.items()}
        return None


@pytest.fixture
def region(
    registry_process: Start,
    postgres_dsn: str,
    s3_store: S3Store,
    tmp_path: Path,
) -> Iterator[Region]:
    """Three replicas r0..r2 of region eu, a peer region us (one server, SQLite), and a
    webhook receiver; GC every second without a grace period."""
    receiver = Receiver()
    peer = registry_process("berth", config={"replication": {"region": "us"}})
    prefix = s3_store.new_prefix("replicas")
    config = {
        **postgres_config(postgres_dsn, tmp_path, pool_size=4),
        "storage": s3_store.server_config(prefix),
        "gc": {"interval_seconds": 1, "grace_seconds": 0},
        "replication": {
            "region": "eu",
            "anti_entropy_interval_seconds": 3600,
            "retry_max_seconds": 1,
            "peers": [{"name": "us", "url": peer.url}],
        },
        "notifications": {
            "endpoints": [{"name": "hook", "url": receiver.url, "retry_max_seconds": 1}]
        },
    }
    replicas = {
        f"r{n}": registry_process(
            "berth",
            config=config,
            env={"BERTH_REPLICA_ID": f"r{n}"},
        )
        for n in range(3)
    }
    try:
        yield Region(replicas, peer, receiver, prefix)
    finally:
        receiver.close()


def peer_status(proc: RegistryProcess) -> dict[str, Any]:
    """The replication status of peer us, as this replica answers it."""
    response = Registry(proc.url, timeout=10).get("/berth/v1/replication/status")
    assert response.status == 200, response
    (status,) = response.json()["peers"]
    assert status["name"] == "us"
    return dict(status)


def push(api: Registry, repo: str, tag: str, layers: list[bytes]) -> str:
    """Push an image as a client would: with GC running every second and no grace, a
    round may collect a blob between its upload and the manifest (the registry then says
    MANIFEST_BLOB_UNKNOWN, as it must); the client uploads it again."""
    config = canonical_json({"repo": repo, "tag": tag})
    for _attempt in range(5):
        for blob in (config, *layers):
            api.push_blob(repo, blob)
        try:
            return api.push_manifest(repo, tag, image_manifest(config, layers))
        except AssertionError as refused:
            if "MANIFEST_BLOB_UNKNOWN" not in str(refused):
                raise
    raise AssertionError(f"{repo}:{tag} refused five times: its blobs keep being collected")


def pushes_seen(receiver: Receiver) -> collections.Counter[str]:
    """How often each push event (by id) reached the receiver."""
    return collections.Counter(e["id"] for e in receiver.events() if e["action"] == "push")


def peer_manifest_puts(peer: RegistryProcess) -> float:
    # Small blobs reach the peer by single POST, so its PUTs answered 201 are manifests.
    return metric(peer, "berth_http_requests_total", 'method="PUT",status="201"')


def test_one_replica_runs_each_task_and_another_takes_over_when_it_dies(
    region: Region,
) -> None:
    held = until(region.single_holders, "one holder for every task")
    print(f"holders: {held}")

    # Pushes spread over the replicas: each change reaches receiver and peer once.
    names = list(region.replicas)
    pushed = []
    latency: dict[bool, list[float]] = {True: [], False: []}  # by: pushed on the holder
    for n in range(12):
        api = region.api(names[n % 3])
        repo = f"team-{n % 2}/app"
        pushed.append((repo, f"v{n}", push(api, repo, f"v{n}", [os.urandom(512)])))
        clock = time.monotonic()
        until(lambda n=n: len(pushes_seen(region.receiver)) == n + 1, "the event", poll=0.005)
        latency[names[n % 3] == held[WEBHOOK_TASK]].append(time.monotonic() - clock)
    for on_holder, times in latency.items():
        where = "the holder" if on_holder else "another replica"
        print(
            f"pushed on {where}: at the webhook after {1000 * statistics.median(times):.0f} ms"
            f" (median of {len(times)}, max {1000 * max(times):.0f} ms)"
        )
    peer = Registry(region.peer.url)
    for repo, tag, digest in pushed:
        until(lambda r=repo, t=tag, d=digest: sha256(peer.manifest(r, t).body) == d, "the peer")
    time.sleep(1.5)  # anything duplicated would arrive by now
    assert set(pushes_seen(region.receiver).values()) == {1}, pushes_seen(region.receiver)
    assert peer_manifest_puts(region.peer) == 12
    delivered = {
        name: metric(proc, "berth_replication_delivered_total", 'peer="us"')
        for name, proc in region.replicas.items()
    }
    assert delivered == {n: (12.0 if n == held[REPLICATION_TASK] else 0.0) for n in names}
    # Every replica's status shows the holder's figures (the operator reads any of them).
    until(
        lambda: all(peer_status(p)["delivered"] == 12 for p in region.replicas.values()),
        "the holder's figures in every replica's status",
    )
    for proc in region.replicas.values():
        status = peer_status(proc)
        assert status["holder"] == held[REPLICATION_TASK] and status["queue_depth"] == 0
        assert status["last_success"] is not None and status["last_error"] is None

    # GC rounds: only the holder's count moves.
    def rounds() -> dict[str, float]:
        return {n: metric(p, "berth_gc_rounds_total") for n, p in region.replicas.items()}

    before = rounds()
    until(lambda: rounds()[held["gc"]] >= before[held["gc"]] + 2, "two more GC rounds")
    after = rounds()
    assert {n for n in names if after[n] != before[n]} == {held["gc"]}
    assert region.single_holders() == held  # nobody else took anything meanwhile

    # SIGKILL the replica delivering to the peer; every task it held moves.
    victim = held[REPLICATION_TASK]
    victim_tasks = {t for t, n in held.items() if n == victim}
    clock = time.monotonic()
    region.replicas[victim].kill()

    def taken_over() -> dict[str, str] | None:
        now = region.single_holders()
        return now if now is not None and victim not in now.values() else None

    after_kill = until(taken_over, "the survivors taking over", timeout=120)
    handover = time.monotonic() - clock
    print(
        f"SIGKILL of {victim} (held {sorted(victim_tasks)}): every task held again after "
        f"{handover:.2f}s: {after_kill}"
    )

    # The new holders deliver what is pushed now, and what was pending stays delivered.
    survivors = region.alive()
    for n in range(12, 18):
        api = region.api(survivors[n % 2])
        pushed.append(("team-0/app", f"v{n}", push(api, "team-0/app", f"v{n}", [os.urandom(512)])))
    clock = time.monotonic()
    until(lambda: len(pushes_seen(region.receiver)) == 18, "18 push events")
    for repo, tag, digest in pushed:
        until(lambda r=repo, t=tag, d=digest: sha256(peer.manifest(r, t).body) == d, "the peer")
    print(f"changes pushed after the handover delivered within {time.monotonic() - clock:.2f}s")
    time.sleep(1.5)
    seen = pushes_seen(region.receiver)
    # At least once; a redelivery only of what was in flight at the kill, never per replica.
    assert len(seen) == 18 and max(seen.values()) <= 2, seen
    assert 18 <= peer_manifest_puts(region.peer) <= 18 + 2
    # The count goes on from the dead holder's (published) figures.
    until(lambda: peer_status(region.replicas[survivors[0]])["delivered"] >= 18, "the count")
    assert peer_status(region.replicas[survivors[1]])["holder"] == after_kill[REPLICATION_TASK]


def test_gc_rounds_between_pushes_on_every_replica_never_lose_a_needed_blob(
    region: Region,
) -> None:
    """Four clients push on the three replicas at once, images sharing base layers, and
    delete some of theirs; GC runs every second with no grace period, so shared layers
    are collected and pushed again all the time. A manifest PUT that finds a blob
    collected since its upload gets MANIFEST_BLOB_UNKNOWN and the client pushes again,
    as real clients do. In the end every committed manifest's blobs are there, on every
    replica, hashing to their digests."""
    held = until(region.single_holders, "one holder for every task")
    names = list(region.replicas)
    bases = [os.urandom(4096) + bytes([n]) for n in range(3)]
    kept: list[tuple[str, str, str]] = []
    retries = collections.Counter[str]()
    lock = threading.Lock()

    def client(worker: int) -> None:
        rng = random.Random(worker)
        mine: list[tuple[str, str, str]] = []
        for n in range(14):
            api = Registry(region.replicas[names[(worker + n) % 3]].url)
            repo = f"gc/app-{worker % 2}"
            tag = f"w{worker}-{n}"
            layers = [rng.choice(bases), os.urandom(1024)]
            config = canonical_json({"repo": repo, "tag": tag})
            body = image_manifest(config, layers)
            for _attempt in range(20):
                for blob in (config, *layers):
                    # Like real clients: a blob the registry has is not uploaded again.
                    if blob not in bases or not api.blob_exists(repo, sha256(blob)):
                        api.push_blob(repo, blob)
                response = api.put_manifest(repo, tag, body)
                if response.status == 201:
                    break
                assert response.status == 400 and b"MANIFEST_BLOB_UNKNOWN" in response.body
                with lock:
                    retries["manifest"] += 1
            else:
                raise AssertionError(f"{repo}:{tag} never landed")
            mine.append((repo, tag, sha256(body)))
            if n % 3 == 2:  # drop an older image: its layers become garbage
                repo_old, _, digest_old = mine.pop(rng.randrange(len(mine) - 1))
                gone = api.request("DELETE", f"/v2/{repo_old}/manifests/{digest_old}")
                assert gone.status == 202, gone
        with lock:
            kept.extend(mine)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))

    gc_holder = region.replicas[held["gc"]]
    rounds = metric(gc_holder, "berth_gc_rounds_total")
    until(lambda: metric(gc_holder, "berth_gc_rounds_total") >= rounds + 2, "two more rounds")
    collected = metric(gc_holder, "berth_gc_blobs_deleted_total")
    print(f"GC collected {collected:.0f} blobs; {retries['manifest']} manifest PUTs retried")
    assert collected > 0
    for proc in region.replicas.values():
        if proc is not gc_holder:
            assert metric(proc, "berth_gc_rounds_total") == 0
    for name in names:
        api = region.api(name)
        for repo, tag, digest in kept:
            response = api.manifest(repo, tag)
            assert response.status == 200, (name, repo, tag, response)
            assert sha256(response.body) == digest
            needed = [response.json()["config"], *response.json()["layers"]]
            for blob in needed:
                assert sha256(api.blob(repo, blob["digest"])) == blob["digest"], (name, blob)


def test_a_holder_whose_session_is_ended_stops_and_another_takes_over(
    region: Region, postgres_dsn: str
) -> None:
    """The database ends the holder's election session (a failover, an administrator):
    the holder, still alive, notices (it reads the idle session), stops its loops and
    competes again; the others have taken over meanwhile."""
    held = until(region.single_holders, "one holder for every task")
    victim = held[WEBHOOK_TASK]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        (ended,) = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (f"berth:{victim}",),
        ).fetchone() or (0,)
    assert ended == 1
    clock = time.monotonic()

    def moved() -> dict[str, str] | None:
        # Not single_holders(): the victim reads its session's end within milliseconds,
        # but a sample of its metrics may still precede that.
        now = holders(region.replicas)
        if all(len(names) == 1 and victim not in names for names in now.values()):
            return {task: names[0] for task, names in now.items()}
        return None

    after = until(moved, "another replica taking the webhook over")
    print(
        f"session of {victim} ended: tasks held again after {time.monotonic() - clock:.2f}s:"
        f" {after}"
    )
    assert region.replicas[victim].running  # alive, only its session was lost
    assert region.single_holders() == after  # and it took nothing back
    api = region.api(victim)  # and it still serves
    digest = push(api, "team-0/app", "after", [os.urandom(512)])
    until(lambda: len(pushes_seen(region.receiver)) == 1, "the push event")
    until(
        lambda: sha256(Registry(region.peer.url).manifest("team-0/app", "after").body) == digest,
        "the peer",
    )
    time.sleep(1.5)
    assert list(pushes_seen(region.receiver).values()) == [1]
