"""Claims on upstream blob fetches shared between processes (storage/fetch_locks.py):
each instance stands for a process of its own (its own descriptors, its own database
session). Files for a pod's workers; PostgreSQL advisory locks for replicas, on a real
server, including a session killed under its holder."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from registry_server.storage.fetch_locks import (
    _BUCKETS,
    NAMESPACE,
    FetchLocks,
    FileFetchLocks,
    NoFetchLocks,
    PostgresFetchLocks,
    _key,
)

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


async def _one_holder_at_a_time(first: FetchLocks, second: FetchLocks) -> None:
    assert await first.try_hold(DIGEST)
    assert not await second.try_hold(DIGEST)  # the other process waits
    assert not await first.try_hold(DIGEST)  # never held twice by one either
    assert await second.try_hold(OTHER)  # other digests are free
    await first.release(DIGEST)
    assert await second.try_hold(DIGEST)
    assert not await first.try_hold(DIGEST)
    await second.release(DIGEST)
    await second.release(OTHER)
    assert await first.try_hold(DIGEST)
    await first.release(DIGEST)


async def test_one_process_holds_a_file_claim_at_a_time(tmp_path: Path) -> None:
    first, second = FileFetchLocks(tmp_path / "locks"), FileFetchLocks(tmp_path / "locks")
    try:
        await _one_holder_at_a_time(first, second)
    finally:
        await first.close()
        await second.close()


async def test_a_closed_holder_lets_go_of_its_file_claims(tmp_path: Path) -> None:
    """As a process that dies: its descriptors close, and its locks with them."""
    first, second = FileFetchLocks(tmp_path / "locks"), FileFetchLocks(tmp_path / "locks")
    assert await first.try_hold(DIGEST)
    await first.close()
    assert await second.try_hold(DIGEST)
    await second.close()


def _same_bucket(name: str) -> str:
    """Another name whose claim falls in ``name``'s lock file."""
    bucket = _key(name) % _BUCKETS
    return next(
        other
        for i in range(1_000_000)
        if _key(other := f"sha256:{i:064x}") % _BUCKETS == bucket and other != name
    )


async def test_names_of_one_bucket_do_not_wait_on_each_other_in_one_process(
    tmp_path: Path,
) -> None:
    """flock is per open file: a second descriptor of this process would wait for the
    first. The process shares its lock instead; another process still waits."""
    here, there = FileFetchLocks(tmp_path / "locks"), FileFetchLocks(tmp_path / "locks")
    neighbour = _same_bucket(DIGEST)
    assert await here.try_hold(DIGEST) and await here.try_hold(neighbour)
    assert not await there.try_hold(neighbour)
    await here.release(DIGEST)
    assert not await there.try_hold(DIGEST)  # the bucket is still held for the other
    await here.release(neighbour)
    assert await there.try_hold(DIGEST)
    await here.close()
    await there.close()


async def test_a_cancelled_claim_leaves_no_lock_behind(tmp_path: Path) -> None:
    """The caller gone while a thread takes the lock: the descriptor is closed when the
    thread is done, so the claim is free for everyone."""
    here, there = FileFetchLocks(tmp_path / "locks"), FileFetchLocks(tmp_path / "locks")
    for _ in range(20):  # cancelled at different points of the hand-off
        claim = asyncio.ensure_future(here.try_hold(DIGEST))
        await asyncio.sleep(0)
        claim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await claim
        if claim.cancelled():
            await asyncio.sleep(0.05)  # the thread finishes
            assert await there.try_hold(DIGEST)
            await there.release(DIGEST)
        else:
            await here.release(DIGEST)
    await here.close()
    await there.close()


async def test_one_process_alone_always_holds() -> None:
    locks = NoFetchLocks()
    assert await locks.try_hold(DIGEST) and await locks.try_hold(DIGEST)


@pytest.fixture
async def pg_locks(postgres_dsn: str) -> AsyncIterator[Callable[[], PostgresFetchLocks]]:
    made: list[PostgresFetchLocks] = []

    def make() -> PostgresFetchLocks:
        made.append(PostgresFetchLocks(postgres_dsn, timeout_seconds=3))
        return made[-1]

    try:
        yield make
    finally:
        for locks in made:
            await locks.close()


@pytest.mark.integration
async def test_one_replica_holds_a_database_claim_at_a_time(
    pg_locks: Callable[[], PostgresFetchLocks],
) -> None:
    await _one_holder_at_a_time(pg_locks(), pg_locks())


@pytest.mark.integration
async def test_a_killed_session_lets_go_of_its_claims(
    pg_locks: Callable[[], PostgresFetchLocks], postgres_dsn: str
) -> None:
    """The holder's session ended by the server (a failover, a terminated backend): its
    claims are free for the others, and the holder claims anew on a new session."""
    first, second = pg_locks(), pg_locks()
    assert await first.try_hold(DIGEST)
    assert not await second.try_hold(DIGEST)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        # With a timeout it waits for the backend to end (without, it only signals it).
        admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = %s",
            (NAMESPACE,),
        )
    assert await second.try_hold(DIGEST)
    await first.release(DIGEST)  # its session has ended: nothing to unlock, no error
    assert not await first.try_hold(DIGEST)  # a new session, and the claim is taken
    await second.release(DIGEST)
    assert await first.try_hold(DIGEST)


@pytest.mark.integration
async def test_a_cancelled_database_claim_ends_its_session(
    pg_locks: Callable[[], PostgresFetchLocks],
) -> None:
    """Cancelled while the server may have granted the lock: the session is ended, so no
    claim outlives the caller that gave up."""
    first, second = pg_locks(), pg_locks()
    assert await first.try_hold(OTHER)  # the session is up
    claim = asyncio.ensure_future(first.try_hold(DIGEST))
    await asyncio.sleep(0.001)
    claim.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await claim
    if claim.cancelled():
        assert await second.try_hold(DIGEST) and await second.try_hold(OTHER)
