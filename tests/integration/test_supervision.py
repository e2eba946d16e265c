"""Worker processes stop with their supervisor, even when it is SIGKILLed: orphans would
keep serving the port and holding the index, so a restarted server could not bind. And a
SIGTERM with a drain period: out of the Service first, serving on, then a clean exit."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.clients import Registry, sha256
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


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_then_shuts_down(
    registry_process: Callable[..., RegistryProcess], workers: int
) -> None:
    """With http.drain_seconds a SIGTERM first takes the server out of its Service
    (/readyz 503) while it goes on serving new connections and an upload in flight,
    then it exits cleanly: a rolling update loses no request routed to it meanwhile."""
    registry = registry_process("berth", config={"http": {"workers": workers, "drain_seconds": 5}})
    api = Registry(registry.url)
    location = api.start_upload("team/app")
    first = os.urandom(1 << 20)
    assert api.patch(location, first, start=0).status == 202
    pid = registry.process.pid
    assert pid is not None
    signalled = time.monotonic()
    os.kill(pid, signal.SIGTERM)

    deadline = signalled + 2
    while (ready := api.get("/readyz")).status != 503:
        assert time.monotonic() < deadline, "/readyz kept saying ready after SIGTERM"
        time.sleep(0.05)
    assert ready.body == b"shutting down\n"
    # Still serving, on new connections: the upload is finished, an image pushed.
    rest = os.urandom(1 << 20)
    assert api.patch(location, rest, start=len(first)).status == 202
    assert api.finish(location, sha256(first + rest)).status == 201
    digest, _ = api.push_image("team/app", "v1", layers=[first + rest])
    assert time.monotonic() - signalled < 4.5, "the checks above took too long to prove much"

    deadline = signalled + 30
    while registry.running:
        assert time.monotonic() < deadline, "the server did not stop after draining"
        time.sleep(0.1)
    assert time.monotonic() - signalled >= 5
    assert registry.process.returncode == 0
    assert not listening(registry.port)
    # What it took in while draining is there after a restart.
    registry.start()
    assert sha256(Registry(registry.url).manifest("team/app", "v1").body) == digest
