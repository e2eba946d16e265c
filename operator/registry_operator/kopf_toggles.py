"""Kopf's readiness gates without quadratic wake-ups.

After a start, Kopf holds every object's first event until every indexed object is indexed:
each indexed object owns a toggle in one `ToggleSet(all)`, and every worker (of indexed and
other kinds alike) waits on the set's condition. Kopf's set wakes every waiter whenever any
toggle is dropped, and each waiter then re-reads every toggle. At 1,000 Registries that is
13,000 waiters woken 4,000 times: the operator ran no handler for 8 minutes after a restart.

`CountingToggleSet` keeps how many of its toggles are on, so its state is read in O(1), and
wakes its waiters once, when the state flips. `install()` makes Kopf build its sets (the
index gate and the pause gate) from it; Kopf's version is pinned in constraints.txt and
`tests/registry_operator/test_kopf_toggles.py` fails if the names patched here change.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable

from kopf._cogs.aiokits import aiotoggles

Combine = Callable[[Iterable[bool]], bool]

# Kopf's two gates of the running operator, as it built them: "indexed" (all: every
# indexed object indexed) and "paused" (any: a peer of higher priority is active).
_gates: dict[str, weakref.ref[CountingToggleSet]] = {}
_installed = False


class CountingToggle(aiotoggles.Toggle):
    """A toggle of a `CountingToggleSet`: tells its set when it turns."""

    def __init__(self, state: bool, *, name: str | None, owner: CountingToggleSet) -> None:
        super().__init__(state, name=name)
        self._owner = owner

    async def turn_to(self, __state: bool) -> None:
        state = bool(__state)
        if state != self._state and self in self._owner:
            self._owner._count(+1 if state else -1)
        await super().turn_to(state)
        self._owner._settle()


class CountingToggleSet(aiotoggles.ToggleSet):
    """`ToggleSet` for `all` and `any` with counts and two events instead of one condition.

    Any other combining function keeps Kopf's own behaviour."""

    def __init__(self, fn: Combine) -> None:
        super().__init__(fn)
        self._counting = fn is all or fn is any
        self._on_count = 0
        self._turned_on = asyncio.Event()
        self._turned_off = asyncio.Event()
        self._settle()
        if fn is all:
            _gates["indexed"] = weakref.ref(self)
        elif fn is any:
            _gates["paused"] = weakref.ref(self)

    def is_on(self) -> bool:
        if self._fn is all:
            return self._on_count == len(self._toggles)
        if self._fn is any:
            return self._on_count > 0
        return super().is_on()

    async def wait_for(self, __state: bool) -> None:
        if not self._counting:
            await super().wait_for(__state)
            return
        wanted = bool(__state)
        event = self._turned_on if wanted else self._turned_off
        while self.is_on() != wanted:
            await event.wait()

    async def make_toggle(
        self, __val: bool = False, *, name: str | None = None
    ) -> aiotoggles.Toggle:
        if not self._counting:
            return await super().make_toggle(__val, name=name)
        toggle = CountingToggle(bool(__val), name=name, owner=self)
        self._toggles.add(toggle)
        self._count(+1 if toggle.is_on() else 0)
        self._settle()
        return toggle

    async def drop_toggle(self, toggle: aiotoggles.Toggle) -> None:
        await self.drop_toggles([toggle])

    async def drop_toggles(self, toggles: Iterable[aiotoggles.Toggle]) -> None:
        if not self._counting:
            await super().drop_toggles(toggles)
            return
        for toggle in toggles:
            if toggle in self._toggles:
                self._toggles.discard(toggle)
                self._count(-1 if toggle.is_on() else 0)
        self._settle()

    def _count(self, change: int) -> None:
        self._on_count += change

    def _settle(self) -> None:
        """Set the event of the state the set is in (waking its waiters once), clear the other."""
        if not self._counting:
            return
        on = self.is_on()
        (self._turned_on if on else self._turned_off).set()
        (self._turned_off if on else self._turned_on).clear()


def install() -> None:
    """Make Kopf build its toggle sets from `CountingToggleSet` (before `kopf.run`)."""
    global _installed
    aiotoggles.ToggleSet = CountingToggleSet  # type: ignore[misc]
    _installed = True


def handling() -> bool:
    """Whether Kopf runs handlers now: its index gate exists and is open (every indexed
    object indexed) and no peer of higher priority has paused this operator. What works
    beside Kopf's handlers (the operator's own pollers) asks this, as Kopf's timers wait
    on those gates. Without `install()` no gate is known: True."""
    if not _installed:
        return True
    indexed = _gates.get("indexed")
    indexed_set = indexed() if indexed is not None else None
    if indexed_set is None or not indexed_set.is_on():
        return False  # not built yet (Kopf starting) or still indexing
    paused = _gates.get("paused")
    paused_set = paused() if paused is not None else None
    return paused_set is None or not paused_set.is_on()
