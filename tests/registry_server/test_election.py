"""Running background work only while elected (events/background.run_elected), over a
hand-driven election, and the local election SQLite servers use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from registry_server.events.background import ELECTED, run_elected
from registry_server.storage.election import Election, LocalElection, Term


class ManualElection(Election):
    """Terms granted and taken away by the test."""

    def __init__(self) -> None:
        self.replica_id = "manual"
        self.granted: asyncio.Queue[Term] = asyncio.Queue()
        self.released: list[Term] = []

    def grant(self, task: str) -> Term:
        term = Term(task)
        self.granted.put_nowait(term)
        return term

    async def acquire(self, task: str) -> Term:
        return await self.granted.get()

    def release(self, term: Term) -> None:
        self.released.append(term)

    async def holders(self, tasks: Sequence[str]) -> dict[str, str]:
        return {}

    async def publish(self, task: str, report: str) -> None:
        pass

    async def reports(self, tasks: Sequence[str]) -> dict[str, str]:
        return {}


async def until(check: Callable[[], bool]) -> None:
    """Poll (the work's counters have no event to wait on); at most 5 s."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def elected(task: str) -> float:
    return ELECTED.labels(task)._value.get()


async def test_work_runs_only_while_the_term_lasts() -> None:
    election = ManualElection()
    running = 0
    started = 0

    async def work() -> None:
        nonlocal running, started
        running += 1
        started += 1
        try:
            await asyncio.Event().wait()
        finally:
            running -= 1

    runner = asyncio.create_task(run_elected(election, "t-run", work))
    await asyncio.sleep(0.05)
    assert started == 0 and elected("t-run") == 0  # not elected yet: nothing runs

    first = election.grant("t-run")
    await until(lambda: running == 1)
    assert elected("t-run") == 1
    first.lost.set()  # the session is gone: the work stops at once
    await until(lambda: running == 0)
    assert elected("t-run") == 0
    assert election.released == [first]

    election.grant("t-run")  # elected again: a fresh start
    await until(lambda: running == 1)
    assert started == 2
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert running == 0 and elected("t-run") == 0
    assert len(election.released) == 2


async def test_failing_work_is_restarted_while_still_held() -> None:
    election = ManualElection()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("one bad round")

    runner = asyncio.create_task(run_elected(election, "t-fail", work, restart_seconds=0.01))
    term = election.grant("t-fail")
    await until(lambda: calls >= 3)
    assert not term.lost.is_set() and election.released == []
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_local_election_holds_everything_or_nothing() -> None:
    holder = LocalElection("r0")
    term = await holder.acquire("gc")
    assert not term.lost.is_set()
    assert await holder.holders(["gc", "webhook:a"]) == {"gc": "r0", "webhook:a": "r0"}

    other = LocalElection("r0", holds=False)  # a worker other than 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(other.acquire("gc"), 0.05)
    assert await other.holders(["gc"]) == {}
    await holder.publish("gc", "figures")
    assert await holder.reports(["gc", "webhook:a"]) == {"gc": "figures"}
