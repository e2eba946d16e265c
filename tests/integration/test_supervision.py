"""Worker processes stop with their supervisor, even when it is SIGKILLed: orphans would
keep serving the port and holding the index, so a restarted server could not bind."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def test_workers_stop_when_the_supervisor_is_killed(
    registry_process: Callable[..., RegistryProcess],
) -> None:
    registry = registry_process("berth", config={"http": {"workers": 2}})
    supervisor = registry.process.pid
    assert supervisor is not None
    deadline = time.monotonic() + 30
    while len(workers := children_of(supervisor)) < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.1)

    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while left := [pid for pid in workers if alive(pid)]:
        assert time.monotonic() < deadline, f"workers outlived their supervisor: {left}"
        time.sleep(0.1)
    # The port is free again: a restarted server can bind it.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", registry.port))
