"""Electing through PostgreSQL (storage/postgres_election.py) on a real server: one holder
per task among several processes' elections, handed over when the holder stops, when it
releases, and when its session is killed under it; and the wake-up another replica's
change sends (storage/postgres_listener.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from registry_server.storage import postgres_index
from registry_server.storage.election import Term
from registry_server.storage.postgres_election import NAMESPACE, PostgresElection, task_key
from registry_server.storage.postgres_index import PostgresIndex
from registry_server.storage.postgres_listener import ChangeListener
from tests.registry_server.test_postgres_index import digest, manifest

pytestmark = pytest.mark.integration

Make = Callable[[str], PostgresElection]


@pytest.fixture
async def make(postgres_dsn: str) -> AsyncIterator[Make]:
    made: list[PostgresElection] = []

    def build(replica: str) -> PostgresElection:
        election = PostgresElection(postgres_dsn, replica, check_seconds=0.2, timeout_seconds=3)
        made.append(election)
        return election

    try:
        yield build
    finally:
        for election in made:
            await election.stop()


async def started(election: PostgresElection) -> PostgresElection:
    await election.start()
    return election


async def first_done(acquiring: dict[str, asyncio.Task[Term]]) -> tuple[str, Term]:
    """The one acquisition that completes first (within 10 s), taken out of ``acquiring``."""
    done, _ = await asyncio.wait(
        acquiring.values(), timeout=10, return_when=asyncio.FIRST_COMPLETED
    )
    assert done, "nobody was elected"
    winners = [name for name, task in acquiring.items() if task in done]
    assert len(winners) == 1, winners
    return winners[0], acquiring.pop(winners[0]).result()


async def test_one_holder_then_handed_over_on_stop(make: Make) -> None:
    elections = {name: await started(make(name)) for name in ("r0", "r1", "r2")}
    acquiring = {n: asyncio.create_task(e.acquire("gc")) for n, e in elections.items()}
    holder, term = await first_done(acquiring)
    await asyncio.sleep(0.6)  # several rounds: still nobody else
    assert not any(t.done() for t in acquiring.values())
    assert await elections["r1"].holders(["gc", "webhook:x"]) == {"gc": holder}

    clock = time.monotonic()
    await elections[holder].stop()  # a graceful stop: its session closes
    assert term.lost.is_set()
    successor, _ = await first_done(acquiring)
    print(f"handover after stop: {time.monotonic() - clock:.2f}s ({holder} -> {successor})")
    assert successor != holder
    for task in acquiring.values():
        task.cancel()


async def test_release_hands_over_and_tasks_are_independent(make: Make) -> None:
    a, b = await started(make("a")), await started(make("b"))
    term_gc = await a.acquire("gc")
    term_hook = await asyncio.wait_for(b.acquire("webhook:h"), 10)  # another task: b
    waiting = asyncio.create_task(b.acquire("gc"))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    a.release(term_gc)
    got = await asyncio.wait_for(waiting, 10)
    assert got.task == "gc" and not got.lost.is_set() and not term_hook.lost.is_set()
    assert await a.holders(["gc", "webhook:h"]) == {"gc": "b", "webhook:h": "b"}
    # Released for good: a does not hold it again behind b's back.
    assert await b.holders(["gc"]) == {"gc": "b"}


async def test_a_killed_session_ends_the_term_and_another_takes_over(
    make: Make, postgres_dsn: str
) -> None:
    a, b = await started(make("a")), await started(make("b"))
    term = await a.acquire("replication:us")
    waiting = asyncio.create_task(b.acquire("replication:us"))
    await asyncio.sleep(0.4)
    assert not waiting.done()
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("berth:a",),
        )
    clock = time.monotonic()
    await asyncio.wait_for(term.lost.wait(), 10)  # a notices within a round or two
    noticed = time.monotonic() - clock
    await asyncio.wait_for(waiting, 10)
    print(
        f"session killed: lost noticed after {noticed:.2f}s, taken over after "
        f"{time.monotonic() - clock:.2f}s"
    )
    # a competes again (a new session) and waits behind b.
    again = asyncio.create_task(a.acquire("replication:us"))
    await asyncio.sleep(0.6)
    assert not again.done()
    assert await a.holders(["replication:us"]) == {"replication:us": "b"}
    again.cancel()


async def test_keys_live_apart_from_the_index_locks(make: Make, postgres_dsn: str) -> None:
    """The election's two-int4 keys never meet the index's bigint keys: a holder does
    not block the migration lock (nor any digest's), whatever the numbers."""
    election = await started(make("a"))
    await election.acquire("gc")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT classid::int8, objid::int8, objsubid FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted"
        ).fetchall()
        assert row == [(NAMESPACE, task_key("gc"), 2)]
        migrations = postgres_index._MIGRATIONS_KEY
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (migrations,)).fetchone()
        assert got == (True,)


async def test_a_change_logged_by_another_replica_wakes_the_listener(postgres_dsn: str) -> None:
    index = await PostgresIndex.connect(postgres_dsn, "eu", ["us"])
    woke = asyncio.Event()
    listener = ChangeListener(postgres_dsn, "r0", woke.set)
    try:
        await listener.start()
        await asyncio.wait_for(woke.wait(), 10)  # once on connecting: what came before
        woke.clear()
        await asyncio.sleep(0.2)
        assert not woke.is_set()
        clock = time.monotonic()
        await index.put_manifest("team/app", manifest(digest(1)), ["v1"])  # logs a change
        await asyncio.wait_for(woke.wait(), 10)
        print(f"woken {1000 * (time.monotonic() - clock):.1f} ms after the commit began")
    finally:
        await listener.stop()
        await index.close()


async def test_a_holder_whose_statement_hangs_gives_up_by_its_own_clock(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a silent network psycopg took another 10 s to cancel and abandon a statement
    that timed out: the holder gave up at about 16 s, when the server's keepalives had
    already freed its lock for another replica, not at check + timeout (found by
    review). A watchdog ends the terms and closes the session by then."""
    election = PostgresElection(postgres_dsn, "r0", check_seconds=0.2, timeout_seconds=0.5)
    await election.start()
    try:
        term = await asyncio.wait_for(election.acquire("gc"), 10)
        real = PostgresElection._query

        async def stuck(self: PostgresElection, *args: object, **kwargs: object) -> object:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # a cancel that goes unanswered
                try:
                    await asyncio.sleep(deadline - time.monotonic())
                except asyncio.CancelledError:
                    continue
            raise TimeoutError("abandoned")

        monkeypatch.setattr(PostgresElection, "_query", stuck)
        started_at = time.monotonic()
        await asyncio.wait_for(term.lost.wait(), 4)
        assert time.monotonic() - started_at < 0.2 + 2 * 0.5 + 1.0
        assert election._conn is None  # closed: the server frees its locks
        monkeypatch.setattr(PostgresElection, "_query", real)
    finally:
        await election.stop()


async def test_nothing_won_on_a_session_the_watchdog_closed_stands(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog could close the session between a round's answer and the round
    granting the terms it won: terms stood on a closed session, with no lock behind
    them, and the task could be held twice (found by review)."""
    election = PostgresElection(postgres_dsn, "r0", check_seconds=0.2, timeout_seconds=3)
    await election.start()
    try:
        await asyncio.wait_for(election.acquire("gc"), 10)
        conn = election._conn
        assert conn is not None
        answer = conn.execute

        async def answered_then_closed(*args: Any, **kwargs: Any) -> Any:
            cursor = await answer(*args, **kwargs)
            election._conn = None  # what the watchdog's _drop does meanwhile
            return cursor

        monkeypatch.setattr(conn, "execute", answered_then_closed)
        with pytest.raises(psycopg.OperationalError):
            await election._query("SELECT 1", ())
        await conn.close()
    finally:
        await election.stop()
