"""Failed-authentication limits shared through the metadata index: processes that each
saw fewer failures than the limit lock a client together once they have synced, on
SQLite (workers) and PostgreSQL (replicas)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry_server.auth.failure_sharing import FailureSharing
from registry_server.auth.ratelimit import FailureLimiter
from registry_server.storage.index import MetadataIndex
from tests.registry_server.test_metadata_index import BACKENDS, open_index


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS)
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataIndex]:
    idx = await open_index(request.param, request, tmp_path)
    yield idx
    await idx.close()


def process(
    index: MetadataIndex, mono: Clock, wall: Clock
) -> tuple[FailureLimiter, FailureSharing]:
    """One worker or replica: its own limiter (5 failures a minute per account and
    client, 20 per client) on its own monotonic clock, sharing through ``index``."""
    limiter = FailureLimiter(5, 60, client_limit=20, clock=mono)
    return limiter, FailureSharing(limiter, index, wall=wall)


async def test_processes_below_the_limit_each_reach_it_together(index: MetadataIndex) -> None:
    wall = Clock(1_700_000_000.0)
    a, sync_a = process(index, Clock(100.0), wall)
    b, sync_b = process(index, Clock(5_000.0), wall)  # clocks that started elsewhere
    for _ in range(3):
        a.record_failure("10.0.0.9", "robot")
    for _ in range(2):
        b.record_failure("10.0.0.9", "robot")
    # Each alone is under 5: both let the client try again.
    assert a.retry_after("10.0.0.9", "robot") == 0
    assert b.retry_after("10.0.0.9", "robot") == 0
    await sync_a.sync_once()
    await sync_b.sync_once()
    await sync_a.sync_once()
    # Together they saw 5: locked on both, for the same time (one failure drains in 12 s).
    assert a.retry_after("10.0.0.9", "robot") == 12
    assert b.retry_after("10.0.0.9", "robot") == 12
    # Only that pair: another account or another client is not held up.
    assert a.retry_after("10.0.0.9", "kubelet") == 0
    assert b.retry_after("10.0.0.8", "robot") == 0


async def test_failures_count_once_however_often_they_are_synced(index: MetadataIndex) -> None:
    wall = Clock(1_700_000_000.0)
    a, sync_a = process(index, Clock(0.0), wall)
    for _ in range(4):
        a.record_failure("10.0.0.9", "robot")
    for _ in range(3):
        await sync_a.sync_once()
    assert a.retry_after("10.0.0.9", "robot") == 0  # still 4 of 5, not 12
    a.record_failure("10.0.0.9", "robot")
    assert a.retry_after("10.0.0.9", "robot") == 12


async def test_a_process_started_later_learns_the_lock_and_drained_keys_go(
    index: MetadataIndex,
) -> None:
    wall = Clock(1_700_000_000.0)
    a, sync_a = process(index, Clock(0.0), wall)
    for _ in range(5):
        a.record_failure("10.0.0.9", "robot")
    await sync_a.sync_once()
    wall.now += 5
    late, sync_late = process(index, Clock(7.0), wall)
    await sync_late.sync_once()
    assert late.retry_after("10.0.0.9", "robot") == 7
    wall.now += 56  # all drained
    await sync_late.sync_once()
    assert await index.draining_auth_failures(wall.now) == []


async def test_the_key_salt_is_the_indexs_so_keys_match_and_names_are_not_stored(
    index: MetadataIndex,
) -> None:
    wall = Clock(1_700_000_000.0)
    a, sync_a = process(index, Clock(0.0), wall)
    a.record_failure("10.0.0.9", "robot")
    await sync_a.sync_once()
    rows = await index.draining_auth_failures(wall.now)
    assert {meter for meter, _, _ in rows} == {"account", "client"}
    assert all(len(key) == 16 and b"robot" not in key for _, key, _ in rows)
