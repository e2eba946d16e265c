"""The rotation probe's answers, against a stand-in server (http.server in a thread): it
asks which hash the server holds, and falls back to a login only where the server is too
old to answer that (404 for the path)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registry_operator import access, fetching, robots

STAGED = robots.Credential("pull.team-a.2", "$2b$05$" + "a" * 53, 0.0, "staged")
ADMIN = ("admin", "admin-secret")


def _basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


class Server:
    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.seen: list[tuple[str, str | None]] = []


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            state.seen.append((self.path, self.headers.get("Authorization")))
            code, body = state.answers.get(path, (404, b"{}"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _held(fingerprint: str | None) -> tuple[int, bytes]:
    return 200, json.dumps({"account": STAGED.name, "fingerprint": fingerprint}).encode()


def test_asks_which_hash_the_server_holds(server: tuple[Server, str]) -> None:
    state, url = server
    state.answers[fetching.CREDENTIALS_PATH] = _held(fetching.fingerprint(STAGED.hash))
    assert fetching.probe(url, ADMIN, STAGED) == access.ACCEPTED
    state.answers[fetching.CREDENTIALS_PATH] = _held(None)
    assert fetching.probe(url, ADMIN, STAGED) == access.REFUSED
    state.answers[fetching.CREDENTIALS_PATH] = _held("0" * 16)
    assert fetching.probe(url, ADMIN, STAGED) == access.REFUSED
    # Only the admin's credentials went out; the staged secret never did.
    assert {auth for _, auth in state.seen} == {_basic(*ADMIN)}
    assert all(path.startswith(fetching.CREDENTIALS_PATH + "?account=") for path, _ in state.seen)


@pytest.mark.parametrize("code", [401, 403, 429, 500])
def test_an_admin_refused_means_wait(server: tuple[Server, str], code: int) -> None:
    state, url = server
    state.answers[fetching.CREDENTIALS_PATH] = (code, b"{}")
    assert fetching.probe(url, ADMIN, STAGED) == access.UNREACHABLE
    assert all(auth == _basic(*ADMIN) for _, auth in state.seen)


def test_an_older_server_is_asked_with_a_login(server: tuple[Server, str]) -> None:
    state, url = server
    state.answers["/v2/"] = (200, b"{}")  # the credentials path is unknown there: 404
    assert fetching.probe(url, ADMIN, STAGED) == access.ACCEPTED
    assert state.seen[-1] == ("/v2/", _basic(STAGED.name, STAGED.password))
    state.answers["/v2/"] = (401, b"{}")
    assert fetching.probe(url, ADMIN, STAGED) == access.REFUSED


def test_unreachable(server: tuple[Server, str]) -> None:
    assert fetching.probe("http://127.0.0.1:9", ADMIN, STAGED) == access.UNREACHABLE
