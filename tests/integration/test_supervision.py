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


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` on any IPv4 address (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return True
    return False


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
    # Nothing listens on the port any more, and a restarted server can bind it. (A
    # connection the dead workers had accepted may linger a moment in a closing state,
    # which can refuse a bind briefly: that is the kernel's, not an orphan serving.)
    assert not listening(registry.port), "something still listens on the registry's port"
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", registry.port))
                break
            except OSError:
                assert time.monotonic() < deadline, f"port {registry.port} stayed in use"
        time.sleep(0.2)
