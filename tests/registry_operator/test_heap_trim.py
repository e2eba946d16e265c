"""The heap trim after long access passes: at once, then at most once per gap, and
always once after the last pass of a burst."""

from __future__ import annotations

import asyncio

import pytest

from registry_operator import __main__ as cli
from registry_operator.handlers import runtime
from tests.registry_operator.fake_kube import FakeKube


def test_trim_heap_is_harmless() -> None:
    cli.trim_heap()


async def test_a_burst_of_passes_is_trimmed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "TRIM_GAP", 0.5)
    trims: list[float] = []
    loop = asyncio.get_running_loop()
    state = runtime.Runtime(kube=FakeKube(), trim_heap=lambda: trims.append(loop.time()))  # type: ignore[arg-type]
    for _ in range(30):  # passes ending one after another, for about 0.2 s
        state._trim_soon()
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.6)
    assert len(trims) == 2  # the first at once, one after the burst
    assert trims[1] - trims[0] >= 0.49
    state.probes.shutdown()
