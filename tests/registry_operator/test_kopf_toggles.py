"""The counting toggle set: Kopf's semantics, one wake-up per waiter, and the patch applies."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable, Iterable

import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._core.reactor import orchestration, running

from registry_operator import kopf_toggles

KOPF_TOGGLE_SET = aiotoggles.ToggleSet


@pytest.mark.parametrize("fn", [all, any])
def test_state_matches_kopfs_set_through_random_operations(
    fn: Callable[[Iterable[bool]], bool],
) -> None:
    async def run() -> None:
        ours, theirs = kopf_toggles.CountingToggleSet(fn), KOPF_TOGGLE_SET(fn)
        pairs: list[tuple[aiotoggles.Toggle, aiotoggles.Toggle]] = []
        rng = random.Random(7)
        for _ in range(2000):
            op = rng.choice(["make", "make", "drop", "turn", "drop-twice"])
            if op == "make" or not pairs:
                state = rng.random() < 0.5
                pairs.append((await ours.make_toggle(state), await theirs.make_toggle(state)))
            elif op == "turn":
                mine, kopfs = rng.choice(pairs)
                state = rng.random() < 0.5
                await mine.turn_to(state)
                await kopfs.turn_to(state)
            else:
                mine, kopfs = pairs.pop(rng.randrange(len(pairs)))
                await ours.drop_toggle(mine)
                await theirs.drop_toggle(kopfs)
                if op == "drop-twice":  # dropping again, or turning a dropped toggle, is a no-op
                    await ours.drop_toggle(mine)
                    await mine.turn_to(not mine.is_on())
            assert ours.is_on() == theirs.is_on()
            assert len(ours) == len(theirs)

    asyncio.run(run())


def test_waiters_wake_once_when_the_set_turns_on() -> None:
    """Kopf's set re-checks every waiter on every dropped toggle (waiters x drops reads);
    this one wakes each waiter when the state flips."""

    class Counted(kopf_toggles.CountingToggleSet):
        reads = 0

        def is_on(self) -> bool:
            Counted.reads += 1
            return super().is_on()

    async def run(waiters: int, objects: int) -> tuple[int, bool]:
        gate = Counted(all)
        toggles = [await gate.make_toggle(name=f"object {i}") for i in range(objects)]
        released = 0

        async def worker() -> None:
            nonlocal released
            await gate.wait_for(True)
            released += 1

        tasks = [asyncio.create_task(worker()) for _ in range(waiters)]
        await asyncio.sleep(0)
        Counted.reads = 0
        for toggle in toggles[:-1]:
            await gate.drop_toggle(toggle)
            await asyncio.sleep(0)
        held = released == 0
        await gate.drop_toggle(toggles[-1])
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert released == waiters
        return Counted.reads, held

    reads, held = asyncio.run(run(waiters=3000, objects=1000))
    assert held, "a waiter ran before the last object was indexed"
    assert reads <= 3 * 3000 + 2 * 1000, reads


def test_waiting_for_off_and_cancelled_waiters() -> None:
    async def run() -> None:
        gate = kopf_toggles.CountingToggleSet(any)
        assert gate.is_off()
        first = await gate.make_toggle(True)
        waiter = asyncio.create_task(gate.wait_for(False))
        cancelled = asyncio.create_task(gate.wait_for(False))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert not waiter.done()
        await first.turn_to(False)
        await asyncio.wait_for(waiter, 5)
        assert cancelled.cancelled()

    asyncio.run(run())


def test_install_replaces_the_sets_kopf_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kopf builds its index gate and pause gate by these names; a Kopf upgrade that renames
    them must fail here rather than silently bring the 8-minute restart back."""
    assert "aiotoggles.ToggleSet(all)" in inspect.getsource(orchestration)
    assert "aiotoggles.ToggleSet(any)" in inspect.getsource(running)
    monkeypatch.setattr(kopf_toggles, "_installed", False)
    monkeypatch.setattr(kopf_toggles, "_gates", {})
    try:
        kopf_toggles.install()
        assert aiotoggles.ToggleSet is kopf_toggles.CountingToggleSet
        assert isinstance(aiotoggles.ToggleSet(all), KOPF_TOGGLE_SET)
    finally:
        aiotoggles.ToggleSet = KOPF_TOGGLE_SET  # type: ignore[misc]
