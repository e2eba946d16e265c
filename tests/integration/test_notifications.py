"""Webhook notifications from a real server to a real HTTP receiver, pushed by real clients.

The receiver is a plain HTTP server in this process that records every envelope; it can
be told to fail, as a receiver that is down or overloaded does.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_auth_clients import SECRETS, Start, policy, start_auth_registry
from tests.support.clients import run_tool
from tests.support.images import make_oci_layout

pytestmark = pytest.mark.integration

ENVELOPE = "application/vnd.docker.distribution.events.v1+json"


class Receiver:
    def __init__(self) -> None:
        self.envelopes: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.refusing = False
        self.refused = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.refusing:
                    receiver.refused += 1
                    self.send_response(503)
                else:
                    receiver.envelopes.append((dict(self.headers), json.loads(body)))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [e for _, envelope in self.envelopes for e in envelope["events"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_push_and_delete_events_reach_the_webhook_even_across_a_crash(
    registry_process: Start, receiver: Receiver, tmp_path: Path
) -> None:
    registry = start_auth_registry(
        registry_process,
        tmp_path,
        policy([{"repository": "team-a/*", "delete": ["root"]}]),
        {
            "notifications": {
                "endpoints": [
                    {
                        "name": "audit",
                        "url": receiver.url,
                        "headers": {"Authorization": "Bearer hook-secret"},
                        "retry_max_seconds": 1,
                    }
                ]
            },
            "replication": {"region": "eu"},
        },
    )
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}

    def crane(*args: str | os.PathLike[str], user: str = "ci") -> Any:
        run_tool("crane", "auth", "login", registry.host, "-u", user, "-p", SECRETS[user], env=env)
        return run_tool("crane", *args, "--insecure", env=env)

    repo = f"{registry.host}/team-a/app"
    first = make_oci_layout(tmp_path / "one", "v1")
    crane("push", tmp_path / "one", f"{repo}:v1")
    (pushed,) = _until(receiver.events, "the push event")
    headers, _ = receiver.envelopes[0]
    assert headers["Content-Type"] == ENVELOPE
    assert headers["Authorization"] == "Bearer hook-secret"
    assert pushed["action"] == "push"
    assert pushed["actor"] == {"name": "ci"}
    assert pushed["source"]["instanceID"] == "eu"
    target = pushed["target"]
    assert target["repository"] == "team-a/app"
    assert target["tag"] == "v1"
    assert target["digest"] == first
    assert target["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert target["size"] == target["length"] > 0
    assert target["url"].endswith(f"/v2/team-a/app/manifests/{first}")

    # The receiver is down: the next event waits in the log, through a SIGKILL of the server.
    receiver.refusing = True
    second = make_oci_layout(tmp_path / "two", "v2")
    crane("push", tmp_path / "two", f"{repo}:v2")
    _until(lambda: receiver.refused >= 1, "a refused delivery")
    registry.process.kill()
    registry.process.start()
    receiver.refusing = False
    _until(lambda: len(receiver.events()) >= 2, "the event logged before the crash")
    assert receiver.events()[1]["target"]["digest"] == second

    crane("delete", f"{repo}@{second}", user="root")
    deleted = _until(
        lambda: [e for e in receiver.events() if e["action"] == "delete"], "the delete event"
    )
    assert [(e["target"].get("digest"), e["actor"]) for e in deleted] == [
        (second, {"name": "root"})
    ]
    # At least once, never lost, never reordered; ids stay the same on redelivery.
    pushes = [e for e in receiver.events() if e["action"] == "push"]
    assert [e["target"]["tag"] for e in pushes][:2] == ["v1", "v2"]
    assert len({e["id"] for e in receiver.events()}) == len(
        {(e["action"], e["target"].get("digest")) for e in receiver.events()}
    )
